"""Property tests: random and mutated bytes never raise anything but WireError."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.identity import NodeIdentity
from p2pfl.wire import EnvelopeVerifier, WireError, pack, seal, unpack

NOW = 1_800_000_000.0
ALICE = NodeIdentity.from_seed(b"a" * 32)
TEMPLATES = [
    seal(ALICE, kind="model", body={"w": b"\x01" * 40, "r": [1, 2.5, None]}, seq=3, now=NOW),
    pack({"a": [1, {"b": "c"}], "d": b"xyz", "e": [[[-1]]], "f": 1.0e10}),
]

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
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
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
