"""msgpack with strict limits: the only way bytes from the network become Python objects.

`unpack` first walks the encoded structure without building anything (`_check_structure`):
it rejects extension types, nesting deeper than ``max_depth``, containers, strings and binaries
above their limits, too many values in total, truncated input and trailing bytes, each with its
own `WireError` reason. Only then does msgpack build the objects, with the same size limits as a
second fence. Every other exception msgpack may raise (bad UTF-8, unhashable map keys, ...) is
converted into ``WireError("malformed")``: nothing else escapes.

Decoded shapes: arrays become lists, maps become dicts with str or bytes keys, str is UTF-8,
bin becomes bytes. Packing is deterministic (dicts keep insertion order, floats are float64).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from p2pfl.wire._errors import WireError

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Upper bounds applied to everything decoded from the network."""

    max_frame_bytes: int = 64 * MiB  # whole frame / whole payload
    max_str_bytes: int = 1 * MiB  # one UTF-8 string (an SDP is a few KiB)
    max_bin_bytes: int = 64 * MiB  # one binary value (a packed model)
    max_array_len: int = 65_536
    max_map_len: int = 4_096
    max_depth: int = 32  # containers inside containers; a scalar has depth 0
    max_values: int = 1_000_000  # values in total, containers included
    # Tensor payloads (see `decode_state_dict`)
    max_tensors: int = 4_096
    max_tensor_ndim: int = 8
    max_tensor_elements: int = 64 * MiB  # elements in one tensor
    max_total_elements: int = 256 * MiB  # elements over the whole state_dict


DEFAULT_LIMITS = DecodeLimits()


def pack(obj: Any) -> bytes:
    """Encode ``obj`` (dict/list/tuple/str/int/float/bool/None/bytes) as msgpack.

    Raises TypeError for objects msgpack cannot encode: that is the caller's bug, not remote input.
    """
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """Decode one msgpack value from ``data`` within ``limits``; raises only `WireError`."""
    if len(data) > limits.max_frame_bytes:
        raise WireError(
            "oversized", f"{len(data)} bytes > max_frame_bytes {limits.max_frame_bytes}"
        )
    _check_structure(data, limits)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limits.max_str_bytes,
            max_bin_len=limits.max_bin_bytes,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises many types; none may escape as such
        raise WireError("malformed", f"{type(exc).__name__}: {exc}") from None


# Binaries at least this large are referenced, not copied, by `pack_parts`.
LARGE_BIN_BYTES = 64 * 1024
_FLAT_TYPES = (int, float, str, bool, type(None))


def pack_parts(obj: Any, parts: list[bytes | memoryview]) -> None:
    """Append the msgpack encoding of ``obj`` to ``parts``: ``b"".join(parts) == pack(obj)``.

    Large binaries are appended by reference, so a 34 MB model is copied once, by the final
    join, instead of three times (msgpack's buffer, its bytes result, then the frame).
    """
    if isinstance(obj, bytes | bytearray | memoryview):
        view = memoryview(obj)
        if view.nbytes >= LARGE_BIN_BYTES and view.c_contiguous:
            parts.append(bin_header(view.nbytes))
            parts.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
            return
        parts.append(pack(obj))
    elif isinstance(obj, dict):
        parts.append(map_header(len(obj)))
        for key, value in obj.items():
            parts.append(pack(key))
            pack_parts(value, parts)
    elif isinstance(obj, list | tuple):
        if all(type(item) in _FLAT_TYPES for item in obj):
            parts.append(pack(obj))
            return
        parts.append(array_header(len(obj)))
        for item in obj:
            pack_parts(item, parts)
    else:
        parts.append(pack(obj))


def bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


# Fixed-size scalars by first byte: number of bytes that follow the type byte.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED.update({0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})
_STR_LEN_BYTES = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN_LEN_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_ARRAY_LEN_BYTES = {0xDC: 2, 0xDD: 4}
_MAP_LEN_BYTES = {0xDE: 2, 0xDF: 4}
_EXT = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


def _check_structure(data: bytes | bytearray | memoryview, limits: DecodeLimits) -> None:
    """Walk one msgpack value in ``data`` header by header, building nothing.

    Cost is one Python step per value; strings and binaries are skipped by their length.
    """
    buf = data if not isinstance(data, memoryview) else data.cast("B")
    end = len(buf)
    pos = 0
    values = 0
    pending: list[int] = []  # values still to read in each enclosing container
    remaining = 1

    def length(at: int, size: int) -> int:
        if at + size > end:
            raise WireError("truncated", f"length field at byte {at} runs past the end")
        return int.from_bytes(buf[at : at + size], "big")

    while True:
        while remaining == 0:
            if not pending:
                if pos != end:
                    raise WireError("malformed", f"{end - pos} trailing bytes after the value")
                return
            remaining = pending.pop()
        if pos >= end:
            raise WireError("truncated", f"input ends at byte {end} inside a value")
        tag = buf[pos]
        pos += 1
        remaining -= 1
        values += 1
        if values > limits.max_values:
            raise WireError("oversized", f"more than max_values {limits.max_values} values")
        if tag <= 0x7F or tag >= 0xE0:  # positive / negative fixint
            continue
        count = -1  # container entries (map: keys + values) when tag opens a container
        if 0xA0 <= tag <= 0xBF:
            pos += _skip_sized(tag & 0x1F, limits.max_str_bytes, "string", pos, end)
        elif tag in _FIXED:
            pos += _FIXED[tag]
            if pos > end:
                raise WireError("truncated", "input ends inside a number")
        elif 0x90 <= tag <= 0x9F:
            count = _container(tag & 0x0F, limits.max_array_len, "array")
        elif 0x80 <= tag <= 0x8F:
            count = 2 * _container(tag & 0x0F, limits.max_map_len, "map")
        elif tag in _BIN_LEN_BYTES:
            size = _BIN_LEN_BYTES[tag]
            n = length(pos, size)
            pos += size
            pos += _skip_sized(n, limits.max_bin_bytes, "binary", pos, end)
        elif tag in _STR_LEN_BYTES:
            size = _STR_LEN_BYTES[tag]
            n = length(pos, size)
            pos += size
            pos += _skip_sized(n, limits.max_str_bytes, "string", pos, end)
        elif tag in _ARRAY_LEN_BYTES:
            size = _ARRAY_LEN_BYTES[tag]
            count = _container(length(pos, size), limits.max_array_len, "array")
            pos += size
        elif tag in _MAP_LEN_BYTES:
            size = _MAP_LEN_BYTES[tag]
            count = 2 * _container(length(pos, size), limits.max_map_len, "map")
            pos += size
        elif tag in _EXT:
            raise WireError("ext_type", f"msgpack extension type at byte {pos - 1}")
        else:  # 0xC1 is never used by msgpack
            raise WireError("malformed", f"invalid msgpack type byte 0x{tag:02x} at {pos - 1}")
        if count >= 0:
            if len(pending) + 1 > limits.max_depth:
                raise WireError("too_deep", f"containers nested deeper than {limits.max_depth}")
            if count > 0:
                pending.append(remaining)
                remaining = count


def _skip_sized(n: int, limit: int, what: str, pos: int, end: int) -> int:
    if n > limit:
        raise WireError("oversized", f"{what} of {n} bytes > limit {limit}")
    if pos + n > end:
        raise WireError("truncated", f"{what} of {n} bytes runs past the end")
    return n


def _container(n: int, limit: int, what: str) -> int:
    if n > limit:
        raise WireError("oversized", f"{what} of {n} entries > limit {limit}")
    return n
