"""Property tests: random and mutated bytes never raise anything but WireError."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.identity import NodeIdentity
from p2pfl.wire import (
    EnvelopeVerifier,
    WireError,
    decode_state_dict,
    encode_state_dict,
    pack,
    seal,
    unpack,
)

NOW = 1_800_000_000.0
ALICE = NodeIdentity.from_seed(b"a" * 32)
TEMPLATES = [
    seal(ALICE, kind="model", body={"w": b"\x01" * 40, "r": [1, 2.5, None]}, seq=3, now=NOW),
    pack({"a": [1, {"b": "c"}], "d": b"xyz", "e": [[[-1]]], "f": 1.0e10}),
]

_STATE = {"w": torch.tensor([[1.0, -2.0]]), "b": torch.tensor([0.5]), "n": torch.tensor(3)}
TENSOR_TEMPLATES = [encode_state_dict(_STATE, c, topk_ratio=0.5) for c in ("fp32", "int8", "topk")]

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def mutated(draw: st.DrawFn, templates: list[bytes] = TEMPLATES) -> bytes:
    data = bytearray(draw(st.sampled_from(templates)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(
                st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xC4, 0xC7, 0xDC, 0xDD, 0xDF, 0xFF])
            )
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def _only_wire_errors(data: bytes) -> Any:
    try:
        return unpack(data)
    except WireError:
        return None


def _open_only_wire_errors(data: bytes) -> None:
    verifier = EnvelopeVerifier(is_trusted=lambda key: True)
    with contextlib.suppress(WireError):
        verifier.open(data, now=NOW)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    _only_wire_errors(data)
    _open_only_wire_errors(data)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_frames_raise_only_wire_error(data: bytes) -> None:
    _only_wire_errors(data)
    _open_only_wire_errors(data)


@settings(max_examples=200)
@given(msgpack_values)
def test_everything_pack_produces_unpacks_to_an_equal_value(value: Any) -> None:
    decoded = unpack(pack(value))
    assert pack(decoded) == pack(value)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(TENSOR_TEMPLATES))
def test_mutated_tensor_payloads_raise_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decoded = decode_state_dict(data)
        assert all(isinstance(t, torch.Tensor) for t in decoded.values())


@settings(max_examples=150)
@given(
    body=msgpack_values,
    kind=st.text(min_size=1, max_size=64),
    seq=st.integers(0, 2**64 - 1),
    skew=st.floats(-59.0, 59.0),
)
def test_any_sealed_body_opens_to_an_equal_envelope(
    body: Any, kind: str, seq: int, skew: float
) -> None:
    frame = seal(ALICE, kind=kind, body=body, seq=seq, now=NOW + skew)
    envelope = EnvelopeVerifier(is_trusted=lambda key: key == ALICE.public_key).open(frame, now=NOW)
    assert (envelope.kind, envelope.seq, envelope.sender) == (kind, seq, ALICE.public_key)
    assert pack(envelope.body) == pack(body)
