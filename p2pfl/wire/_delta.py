"""Top-k of the update with error feedback: a per-link delta codec for state_dicts.

Raw-weight top-k sends 1 % of a model and zeros for the rest, which the receiver then averages
into its own model. This codec sends the top-k of the *update* instead: the difference between
the model and a reference that sender and receiver both hold, the receiver's reconstruction of
the last model this sender sent on this link. The sender overwrites the k coordinates of its
reference where the model differs most, sends the model's values there, and the receiver
overwrites the same coordinates of its copy. Whatever was not sent stays in the difference and
is sent later (error feedback by reference tracking, as in CHOCO-gossip), so the receiver's copy
converges to the sender's model instead of to a sparse caricature of it.

Layout (msgpack, see protocols/SPEC.md section 6)::

    ["p2pfl.state_delta", 1, base, seq, digest, payload]

- ``base`` = 0: a keyframe; ``digest`` is nil and ``payload`` is a full ``p2pfl.state_dict``
  (any codec) that becomes the reference. ``base`` > 0: a delta on the reference numbered
  ``base`` whose ``digest`` (bin 8) is :func:`state_digest` of that reference; ``payload`` is a
  ``p2pfl.state_dict`` with codec ``topk`` whose floating entries carry the model's *values* at
  the listed indices (they replace the reference's values; nothing is added, so both sides stay
  bit-identical), and whose other entries are sent whole.
- ``seq`` numbers the reference this message produces on the link; ``seq > base``. Reference 1
  may be a model both sides hold without sending it (``initial``: every node builds the task's
  initial model from the seed), so a link need not start with a keyframe.

Guarantees:
- Sender and receiver hold bit-identical references after every message the receiver decodes.
- A delta whose ``base`` is not the receiver's current reference (a lost or refused message, a
  restart on either side), or whose ``digest`` differs from the receiver's reference (different
  initial models), cannot be reconstructed: ``WireError("bad_tensor")``, which the driver
  counts as a dropped message. The sender sends a keyframe first on a link, every
  ``keyframe_every`` messages, and after ``reset()`` (the driver calls it on a new session), so
  a link heals by itself.
- Decoding returns fresh tensors: a handle given to the learner is never changed afterwards.
- The state is one reference (one model) per link and direction.

For protocols with a round reference (FedAvg) :class:`UpdateEncoder` / :func:`decode_update`
send the top-k of ``model - reference`` *added* to the reference, with the unsent rest kept by
the sender as a residual for the next round (``["p2pfl.state_update", 1, digest, payload]``),
and ``DeltaEncoder(topk_ratio=None)`` sends a new global model as exactly the coordinates that
changed since the previous one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from p2pfl.wire._codec import DEFAULT_LIMITS, DecodeLimits, pack, unpack
from p2pfl.wire._errors import WireError
from p2pfl.wire._tensors import (
    CODECS,
    decode_sparse_state_dict,
    decode_state_dict,
    encode_state_dict,
)

if TYPE_CHECKING:
    import torch

DELTA_FORMAT = "p2pfl.state_delta"
DELTA_VERSION = 1
MAX_DELTA_SEQ = 2**63


def _copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def state_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """8 bytes of SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:8]


class DeltaEncoder:
    """The sending end of one link: top-k of (model - reference), reference tracking.

    ``topk_ratio=None`` sends exactly the coordinates that changed (lossless; small when the
    model changed sparsely, e.g. a global model built from sparse updates).
    """

    def __init__(
        self,
        *,
        topk_ratio: float | None = 0.01,
        keyframe_every: int = 64,
        keyframe_codec: str = "fp32",
        initial: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if topk_ratio is not None and not 0.0 < topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1] or None, got {topk_ratio}")
        if keyframe_every < 1:
            raise ValueError(f"keyframe_every must be at least 1, got {keyframe_every}")
        if keyframe_codec not in CODECS or keyframe_codec == "topk":
            raise ValueError(f"keyframe_codec must be a dense codec, got {keyframe_codec!r}")
        self.topk_ratio = topk_ratio
        self.keyframe_every = keyframe_every
        self.keyframe_codec = keyframe_codec
        self._initial = None if initial is None else _copy(initial)
        self._reference: dict[str, torch.Tensor] | None = None
        self._seq = 0
        self._deltas_since_keyframe = 0
        self.reset()

    @property
    def reference(self) -> dict[str, torch.Tensor] | None:
        """A copy of what the receiver holds of this sender's model (None before a keyframe)."""
        return None if self._reference is None else _copy(self._reference)

    def reset(self) -> None:
        """Back to the start of a link (new session): reference 1 is ``initial`` if given,
        else the next message is a keyframe."""
        self._reference = None if self._initial is None else _copy(self._initial)
        self._seq = 0 if self._initial is None else 1
        self._deltas_since_keyframe = 0

    def encode(self, state: Mapping[str, torch.Tensor]) -> bytes:
        reference = self._reference
        if (
            reference is None
            or self._deltas_since_keyframe + 1 >= self.keyframe_every
            or reference.keys() != state.keys()
            or any(reference[k].shape != v.shape for k, v in state.items())
        ):
            return self._keyframe(state)
        import torch

        indices: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            if not value.is_floating_point():
                continue
            flat = value.detach().reshape(-1)
            diff = (flat.to(torch.float64) - reference[name].reshape(-1).to(torch.float64)).abs()
            if self.topk_ratio is None:  # lossless: exactly the coordinates that changed
                indices[name] = torch.nonzero(diff).reshape(-1)
                continue
            k = min(flat.numel(), max(1, math.ceil(self.topk_ratio * flat.numel())))
            if flat.numel() == 0:
                k = 0
            indices[name] = torch.topk(diff, k, sorted=False).indices.sort().values
        payload = encode_state_dict(state, "topk", topk_indices=indices)
        digest = state_digest(reference)
        base, self._seq = self._seq, self._seq + 1
        with torch.no_grad():
            for name, value in state.items():
                if name in indices:
                    chosen = indices[name]
                    reference[name].view(-1)[chosen] = value.detach().reshape(-1)[chosen]
                else:
                    reference[name] = value.detach().clone()
        self._deltas_since_keyframe += 1
        return pack([DELTA_FORMAT, DELTA_VERSION, base, self._seq, digest, payload])

    def _keyframe(self, state: Mapping[str, torch.Tensor]) -> bytes:
        payload = encode_state_dict(state, self.keyframe_codec)
        # The receiver's reference is what it decodes: the same bytes decoded here.
        self._reference = _copy(decode_state_dict(payload))
        self._seq += 1
        self._deltas_since_keyframe = 0
        return pack([DELTA_FORMAT, DELTA_VERSION, 0, self._seq, None, payload])


class DeltaDecoder:
    """The receiving end of one link: rebuilds models from keyframes and deltas."""

    def __init__(
        self,
        limits: DecodeLimits = DEFAULT_LIMITS,
        *,
        initial: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.limits = limits
        self._initial = None if initial is None else _copy(initial)
        self._reference: dict[str, torch.Tensor] | None = None
        self._seq = 0
        self.reset()

    def reset(self) -> None:
        """Back to the start of a link (new session): reference 1 is ``initial`` if given,
        else only a keyframe can be decoded next."""
        self._reference = None if self._initial is None else _copy(self._initial)
        self._seq = 0 if self._initial is None else 1

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
        """The sender's model; raises only `WireError` (``bad_tensor``: not reconstructible)."""
        if len(data) > self.limits.max_frame_bytes:
            raise WireError("oversized", f"state delta of {len(data)} bytes")
        message = unpack(data, self.limits)
        if (
            not isinstance(message, list)
            or len(message) != 6
            or message[0] != DELTA_FORMAT
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in message[1:4])
            or not isinstance(message[4], bytes | None)
            or not isinstance(message[5], bytes)
        ):
            raise WireError("malformed", f"not a {DELTA_FORMAT} payload")
        _, version, base, seq, digest, payload = message
        if version != DELTA_VERSION:
            raise WireError("bad_version", f"state delta format {version}")
        if not 0 <= base < seq <= MAX_DELTA_SEQ or (digest is None) != (base == 0):
            raise WireError("malformed", f"state delta base {base}, seq {seq}")
        if base == 0:
            state = decode_state_dict(payload, self.limits)
            self._reference, self._seq = _copy(state), seq
            return state
        reference = self._reference
        if reference is None or base != self._seq:
            raise WireError(
                "bad_tensor",
                f"state delta on reference {base}, this link holds {self._seq or 'none'}",
            )
        if digest != state_digest(reference):
            raise WireError("bad_tensor", f"state delta on reference {base}: digest differs")
        entries = decode_sparse_state_dict(payload, self.limits)
        if entries.keys() != reference.keys():
            raise WireError("bad_tensor", "state delta names other tensors than its reference")
        updated: dict[str, torch.Tensor] = {}
        for name, (values, indices) in entries.items():
            ref = reference[name]
            if values.dtype != ref.dtype:
                raise WireError("bad_tensor", f"tensor {name[:60]!r}: dtype differs from reference")
            if indices is None:
                if values.shape != ref.shape:
                    raise WireError("bad_tensor", f"tensor {name[:60]!r}: shape differs")
                updated[name] = values
                continue
            if indices.numel() and int(indices.max()) >= ref.numel():
                raise WireError("bad_tensor", f"tensor {name[:60]!r}: index beyond reference")
            rebuilt = ref.clone()
            rebuilt.view(-1)[indices] = values
            updated[name] = rebuilt
        # Only a fully checked delta moves the reference.
        self._reference, self._seq = updated, seq
        return _copy(updated)


# -- updates on a round's reference ----------------------------------------------------------

UPDATE_FORMAT = "p2pfl.state_update"
UPDATE_VERSION = 1


class UpdateEncoder:
    """Top-k of a model's update on a reference both ends hold, with error feedback.

    For rounds with a shared reference (FedAvg: the round's global model, which the aggregator
    sent and every participant adopted): the update is ``model - reference`` plus what earlier
    rounds did not send (the residual this encoder keeps); the k largest-magnitude coordinates
    are sent, the rest stays in the residual for the next round. One encoder per sender (its
    residual spans rounds); the receiver needs no state beyond the reference.
    """

    def __init__(self, *, topk_ratio: float = 0.01) -> None:
        if not 0.0 < topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {topk_ratio}")
        self.topk_ratio = topk_ratio
        self._residual: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the residual (e.g. a new federation or a restart from a checkpoint)."""
        self._residual = {}

    def encode(
        self, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
    ) -> bytes:
        import torch

        if state.keys() != reference.keys():
            raise ValueError("state and reference name different tensors")
        sent: dict[str, torch.Tensor] = {}
        indices: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            value = value.detach()
            if not value.is_floating_point():
                sent[name] = value
                continue
            if reference[name].shape != value.shape:
                raise ValueError(f"{name}: shape differs from the reference")
            update = value - reference[name].to(value.dtype)
            residual = self._residual.get(name)
            if residual is not None and residual.shape == update.shape:
                update = update + residual
            flat = update.reshape(-1)
            k = min(flat.numel(), max(1, math.ceil(self.topk_ratio * flat.numel())))
            chosen = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            kept = torch.zeros_like(flat)
            kept[chosen] = flat[chosen]
            self._residual[name] = (flat - kept).reshape(update.shape)
            sent[name] = update
            indices[name] = chosen
        payload = encode_state_dict(sent, "topk", topk_indices=indices)
        return pack([UPDATE_FORMAT, UPDATE_VERSION, state_digest(reference), payload])


def decode_update(
    data: bytes | bytearray | memoryview,
    reference: Mapping[str, torch.Tensor],
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> dict[str, torch.Tensor]:
    """``reference`` + the sparse update in ``data`` (`UpdateEncoder`), as fresh tensors.

    Raises only `WireError`: ``bad_tensor`` when the update was made on another reference
    (digest) or does not fit it.
    """
    message = unpack(data, limits)
    if (
        not isinstance(message, list)
        or len(message) != 4
        or message[0] != UPDATE_FORMAT
        or not isinstance(message[1], int)
        or isinstance(message[1], bool)
        or not isinstance(message[2], bytes)
        or not isinstance(message[3], bytes)
    ):
        raise WireError("malformed", f"not a {UPDATE_FORMAT} payload")
    _, version, digest, payload = message
    if version != UPDATE_VERSION:
        raise WireError("bad_version", f"state update format {version}")
    if digest != state_digest(reference):
        raise WireError("bad_tensor", "state update made on another reference (digest differs)")
    entries = decode_sparse_state_dict(payload, limits)
    if entries.keys() != reference.keys():
        raise WireError("bad_tensor", "state update names other tensors than its reference")
    out: dict[str, torch.Tensor] = {}
    for name, (values, indices) in entries.items():
        ref = reference[name]
        if values.dtype != ref.dtype:
            raise WireError("bad_tensor", f"tensor {name[:60]!r}: dtype differs from reference")
        if indices is None:
            if values.shape != ref.shape or ref.is_floating_point():
                raise WireError("bad_tensor", f"tensor {name[:60]!r}: not a sparse update")
            out[name] = values
            continue
        if indices.numel() and int(indices.max()) >= ref.numel():
            raise WireError("bad_tensor", f"tensor {name[:60]!r}: index beyond reference")
        rebuilt = ref.detach().clone()
        rebuilt.view(-1)[indices] += values
        out[name] = rebuilt
    return out
