"""unpack: strict limits, each with its own reason; round trips of what pack produces."""

from __future__ import annotations

import msgpack
import pytest

from p2pfl.wire import DecodeLimits, WireError, pack, unpack
from p2pfl.wire._codec import pack_parts


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -1,
        2**64 - 1,
        -(2**63),
        1.5,
        "",
        "é" * 300,
        b"",
        b"\x00" * 70000,
        [],
        {},
        {"a": [1, {"b": b"c"}]},
        list(range(70)),
        {str(i): i for i in range(20)},
    ],
)
def test_pack_unpack_round_trip(value: object) -> None:
    assert unpack(pack(value)) == value


def test_pack_is_deterministic_in_insertion_order() -> None:
    assert pack({"a": 1, "b": 2}) == b"\x82\xa1a\x01\xa1b\x02"


@pytest.mark.parametrize(
    ("data", "limits", "reason"),
    [
        (pack(b"x" * 100), DecodeLimits(max_frame_bytes=50), "oversized"),
        (pack(b"x" * 100), DecodeLimits(max_bin_bytes=99), "oversized"),
        (pack("x" * 100), DecodeLimits(max_str_bytes=99), "oversized"),
        (pack(list(range(20))), DecodeLimits(max_array_len=19), "oversized"),
        (pack({str(i): i for i in range(20)}), DecodeLimits(max_map_len=19), "oversized"),
        (pack([[1, 2], [3, 4]]), DecodeLimits(max_values=6), "oversized"),
        (pack([[[]]]), DecodeLimits(max_depth=2), "too_deep"),
        (pack({"a": {"b": {}}}), DecodeLimits(max_depth=2), "too_deep"),
        (b"\xdd\xff\xff\xff\xff", DecodeLimits(), "oversized"),  # claims 4G entries
        (b"\xc6\xff\xff\xff\xf0", DecodeLimits(), "oversized"),  # claims 4 GB binary
        (b"\xc6\x00\x00\x00\x10abc", DecodeLimits(), "truncated"),
        (b"\x92\x01", DecodeLimits(), "truncated"),
        (b"\xcb\x00", DecodeLimits(), "truncated"),
        (b"", DecodeLimits(), "truncated"),
        (b"\x01\x02", DecodeLimits(), "malformed"),  # trailing bytes
        (b"\xc1", DecodeLimits(), "malformed"),
        (b"\xa2\xff\xfe", DecodeLimits(), "malformed"),  # invalid UTF-8
        (b"\x81\x01\x02", DecodeLimits(), "malformed"),  # int map key
        (b"\x81\x90\x02", DecodeLimits(), "malformed"),  # unhashable map key
        (msgpack.packb(msgpack.ExtType(5, b"abc")), DecodeLimits(), "ext_type"),
        (b"\xd6\xff\x00\x00\x00\x00", DecodeLimits(), "ext_type"),  # timestamp ext
    ],
)
def test_unpack_rejects_with_reason(data: bytes, limits: DecodeLimits, reason: str) -> None:
    with pytest.raises(WireError) as info:
        unpack(data, limits)
    assert info.value.reason == reason


def test_depth_limit_counts_nested_containers_exactly() -> None:
    nested: object = []
    for _ in range(31):
        nested = [nested]
    assert unpack(pack(nested)) == nested  # depth 32 is allowed by default
    with pytest.raises(WireError, match="too_deep"):
        unpack(pack([nested]))


def test_unpack_accepts_memoryview_slices() -> None:
    data = b"junk" + pack({"k": [1, 2]})
    assert unpack(memoryview(data)[4:]) == {"k": [1, 2]}


@pytest.mark.parametrize(
    "value",
    [
        {"w": b"\x01" * 70_000, "n": [1, 2.5, None], "deep": [{"x": bytearray(100_000)}]},
        [b"a" * 65_536] * 3 + [list(range(40)), {str(i): [i] for i in range(20)}],
        memoryview(bytes(range(256)) * 300),
        (1, "two", [b"3" * 70_000]),
    ],
)
def test_pack_parts_joins_to_exactly_pack(value: object) -> None:
    parts: list[bytes | memoryview] = []
    pack_parts(value, parts)
    assert b"".join(parts) == pack(value)
