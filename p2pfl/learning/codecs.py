"""How models travel: the ``codec`` of a setup, one encode/decode for the daemon and both engines.

``codec`` is a key of the setup description (:class:`p2pfl.learning.factory.LearnerSetup`): the
daemon's ``[protocol] codec`` and a scenario's ``[[setup]] codec``. Every model a node sends is
encoded with :func:`encode_model` and decoded at the receiver with :func:`decode_model`: the
daemon's driver does it on the wire, the virtual engine does it on every ``Send`` (so accuracy
reflects the quantisation and the bytes counted are the encoded ones). The tensor format itself is
``p2pfl.wire`` (``encode_state_dict``/``decode_state_dict``).

Which codecs are accepted follows issue 13's rule, "a codec that cannot meet the target is
removed, not shipped": raw-weight top-k (1 % of the weights, not of an update) took digits from
0.93 to 0.48-0.53, and per-link top-k deltas still miss the accuracy target in gossip
(benchmarks/README.md), so ``"topk"`` is refused with the reason, everywhere.

This module imports no torch (configuration loaders use :func:`codec_problem`); the encode and
decode functions import the wire tensor codec when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pfl.wire import DecodeLimits

CODECS = ("fp32", "fp16", "bf16", "int8")
"""The codecs a setup may name: "fp32" lossless; "fp16"/"bf16" half the bytes; "int8" a quarter
(one scale per tensor)."""

REFUSED = {
    "topk": (
        "top-k of the raw weights is not shipped: keeping 1 % of the weights destroys learning "
        "(digits: 0.48-0.53 accuracy against 0.93 with fp32, issue 13), and top-k of the update "
        'misses the accuracy target in gossip (benchmarks/README.md); use "int8" (4x fewer '
        'bytes at fp32 accuracy) or "fp16"'
    ),
}
"""Codec names that were once accepted, with why they are refused and what to use instead."""


def codec_problem(codec: object) -> str | None:
    """What is wrong with ``codec`` as a setup's codec, or None if it is accepted."""
    if isinstance(codec, str) and codec in REFUSED:
        return REFUSED[codec]
    if codec not in CODECS:
        return f"must be one of {', '.join(CODECS)}; got {codec!r}"
    return None


def encode_model(state: Any, codec: str) -> bytes:
    """A state_dict as the bytes a node sends (``p2pfl.wire.encode_state_dict``)."""
    from p2pfl.wire import encode_state_dict

    problem = codec_problem(codec)
    if problem is not None:
        raise ValueError(f"codec: {problem}")
    return encode_state_dict(state, codec)


def decode_model(data: bytes | bytearray | memoryview, limits: DecodeLimits | None = None) -> Any:
    """The state_dict a receiver gets from :func:`encode_model`'s bytes; raises ``WireError``."""
    from p2pfl.wire import DEFAULT_LIMITS, decode_state_dict

    return decode_state_dict(data, DEFAULT_LIMITS if limits is None else limits)
