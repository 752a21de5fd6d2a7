"""The signed envelope every peer-to-peer message travels in.

A frame is two msgpack values back to back::

    payload   = [version, kind, sender, sender_id, recipient, seq, timestamp_ms, body]
    signature = bin 8 of length 64 (bytes c4 40 + the 64 signature bytes)

The signed bytes are exactly the payload bytes as sent. The signature is Ed25519 over
``domain || 0x00 || SHA-256(payload)`` (`signing_input`), so a frame signed for one purpose
(say, signaling) never verifies as another (a protocol message). ``sender`` is the 32-byte
public key; ``sender_id`` its node id, which must match the key. ``recipient`` is a public key
or nil for "any peer". ``seq`` grows per sender (see `SequenceCounter`), ``timestamp_ms`` is the
sender's wall clock in milliseconds. See protocols/SPEC.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from p2pfl.identity import NodeIdentity, node_id_for, verify_signature
from p2pfl.wire._codec import DEFAULT_LIMITS, DecodeLimits, pack_parts, unpack
from p2pfl.wire._domain import Domain, signing_input
from p2pfl.wire._errors import WireError
from p2pfl.wire._replay import ReplayGuard

VERSION = 1
MAX_KIND_CHARS = 64
MAX_SEQ = 2**64 - 1
_SIGNATURE_TRAILER = b"\xc4\x40"  # msgpack header of a 64-byte bin
_TRAILER_BYTES = len(_SIGNATURE_TRAILER) + 64
_PAYLOAD_FIELDS = 8


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """A verified message: who sent it, to whom, when, and its body."""

    version: int
    kind: str
    sender: bytes  # 32-byte Ed25519 public key
    recipient: bytes | None  # public key of the addressee; None: any peer
    seq: int
    timestamp_ms: int
    body: Any  # msgpack-decoded: dict/list/str/int/float/bool/None/bytes

    @property
    def sender_id(self) -> str:
        return node_id_for(self.sender)


class SequenceCounter:
    """Sequence numbers for one sender that keep growing across restarts.

    Starts at the current time in microseconds, so a restarted node continues above every number
    it sent before (unless it sent more than a million frames per second).
    """

    def __init__(self, now: float) -> None:
        self._next = int(now * 1_000_000)

    def next(self) -> int:
        value = self._next
        self._next += 1
        return value


def seal(
    identity: NodeIdentity,
    *,
    kind: str,
    body: Any,
    seq: int,
    now: float,
    recipient: bytes | None = None,
    domain: Domain = Domain.MESSAGE,
) -> bytes:
    """Encode and sign one frame. Raises ValueError/TypeError for invalid arguments."""
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
        raise ValueError(f"kind must be a non-empty string of at most {MAX_KIND_CHARS} chars")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq must be an int in [0, 2**64), got {seq!r}")
    if recipient is not None and len(recipient) != 32:
        raise ValueError("recipient must be a 32-byte public key or None")
    timestamp_ms = round(now * 1000)
    payload = [
        VERSION,
        kind,
        identity.public_key,
        identity.node_id,
        None if recipient is None else bytes(recipient),
        seq,
        timestamp_ms,
        body,
    ]
    # The payload is built as a list of parts, large binaries by reference: the model bytes are
    # hashed in place and copied once, into the frame.
    parts: list[bytes | memoryview] = []
    pack_parts(payload, parts)
    to_sign = signing_input(domain, *parts)
    parts.append(_SIGNATURE_TRAILER)
    parts.append(identity.sign(to_sign))
    return b"".join(parts)


class EnvelopeVerifier:
    """Checks incoming frames: limits, signature, trust, recipient, clock skew and replay.

    `open` returns the `Envelope` or raises `WireError` with a reason slug; it never raises
    anything else. Only an accepted frame changes the verifier's state (its replay windows).
    """

    def __init__(
        self,
        *,
        is_trusted: Callable[[bytes], bool],
        max_skew_s: float = 60.0,
        limits: DecodeLimits = DEFAULT_LIMITS,
        own_key: bytes | None = None,
        replay_window: int = 1024,
    ) -> None:
        self._is_trusted = is_trusted
        self._max_skew_ms = max_skew_s * 1000.0
        self._limits = limits
        self._own_key = own_key
        self._replay = ReplayGuard(window=replay_window)

    def open(
        self, frame: bytes | bytearray | memoryview, *, now: float, domain: Domain = Domain.MESSAGE
    ) -> Envelope:
        envelope = self._check(frame, now=now, domain=domain)
        self._replay.commit(envelope.sender, envelope.seq)
        return envelope

    def replay_state(self) -> dict[bytes, tuple[int, int]]:
        """Copy of the replay windows: sender key -> (highest seq, bitmap of seen seqs)."""
        return self._replay.snapshot()

    def _check(
        self, frame: bytes | bytearray | memoryview, *, now: float, domain: Domain
    ) -> Envelope:
        limits = self._limits
        if len(frame) > limits.max_frame_bytes:
            raise WireError(
                "oversized",
                f"frame of {len(frame)} bytes > max_frame_bytes {limits.max_frame_bytes}",
            )
        if len(frame) <= _TRAILER_BYTES:
            raise WireError("truncated", f"frame of {len(frame)} bytes is shorter than a signature")
        view = memoryview(frame).cast("B")
        signed, trailer = view[:-_TRAILER_BYTES], view[-_TRAILER_BYTES:]
        payload = unpack(signed, limits)
        if trailer[:2] != _SIGNATURE_TRAILER:
            raise WireError("malformed", "frame does not end with a 64-byte signature")
        envelope, claimed_id = _envelope_from_payload(payload)
        if claimed_id != node_id_for(envelope.sender):
            raise WireError(
                "id_key_mismatch", f"claimed sender id {claimed_id!r} is not the key's id"
            )
        if not self._is_trusted(envelope.sender):
            raise WireError("unknown_key", f"sender {claimed_id[:8]} is not trusted here")
        if not verify_signature(envelope.sender, bytes(trailer[2:]), signing_input(domain, signed)):
            raise WireError(
                "bad_signature", f"signature of {claimed_id[:8]} invalid for {domain.name}"
            )
        own, recipient = self._own_key, envelope.recipient
        if own is not None and recipient is not None and recipient != own:
            raise WireError("wrong_recipient", "addressed to another node")
        age_ms = now * 1000.0 - envelope.timestamp_ms
        if age_ms > self._max_skew_ms:
            raise WireError("expired", f"sent {age_ms / 1000:.1f} s ago (skew limit exceeded)")
        if -age_ms > self._max_skew_ms:
            raise WireError("from_future", f"timestamp {-age_ms / 1000:.1f} s in the future")
        self._replay.check(envelope.sender, envelope.seq)
        return envelope


def _envelope_from_payload(payload: Any) -> tuple[Envelope, str]:
    if not isinstance(payload, list) or len(payload) != _PAYLOAD_FIELDS:
        raise WireError("malformed", f"payload is not an array of {_PAYLOAD_FIELDS} fields")
    version, kind, sender, claimed_id, recipient, seq, timestamp_ms, body = payload
    if type(version) is not int:
        raise WireError("malformed", "version is not an integer")
    if version != VERSION:
        raise WireError("bad_version", f"envelope version {version}, this node speaks {VERSION}")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
        raise WireError("malformed", "kind is not a short non-empty string")
    if not isinstance(sender, bytes) or len(sender) != 32:
        raise WireError("malformed", "sender is not a 32-byte public key")
    if not isinstance(claimed_id, str):
        raise WireError("malformed", "sender id is not a string")
    if recipient is not None and (not isinstance(recipient, bytes) or len(recipient) != 32):
        raise WireError("malformed", "recipient is neither nil nor a 32-byte public key")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise WireError("malformed", "seq is not an integer in [0, 2**64)")
    if type(timestamp_ms) is not int or not 0 <= timestamp_ms < 2**63:
        raise WireError("malformed", "timestamp_ms is not a non-negative integer")
    envelope = Envelope(version, kind, sender, recipient, seq, timestamp_ms, body)
    return envelope, claimed_id
