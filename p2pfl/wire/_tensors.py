"""torch state_dict <-> bytes, without pickle and without torch.load.

Layout (msgpack, see protocols/SPEC.md)::

    ["p2pfl.state_dict", 1, codec, [entry, ...]]
    entry = [name, dtype, shape, encoding, data, extra]

``dtype`` is the tensor's own dtype (`DTYPES`); decoding gives back that dtype and shape.
``encoding`` says how ``data`` (bin, little-endian) stores the values:

- ``raw``: the values in ``dtype``; extra nil. Lossless.
- ``fp16``: IEEE half precision; extra nil. Error <= ``max(2**-11 * |x|, 2**-25)``; the encoder
  refuses values above 65504 (they would become infinite).
- ``bf16``: bfloat16; extra nil. Error <= ``max(2**-8 * |x|, 2**-133)``.
- ``int8``: ``round(x / scale)`` in [-127, 127]; extra = scale (float64) = ``max|x| / 127``.
  Error <= ``scale / 2`` = ``max|x| / 254`` (plus float32 rounding of the product).
- ``topk``: the k largest-magnitude values in ``dtype``; extra = their flat indices (uint32,
  strictly increasing). Kept values are exact; each dropped value is at most the smallest kept
  magnitude, so the error is <= that magnitude per element.

(Bounds are for float32 tensors; a float16/bfloat16 tensor adds its own rounding on decode.)
The codec ("fp32", "fp16", "bf16", "int8", "topk") applies to floating-point tensors; integer and
bool tensors (e.g. BatchNorm's ``num_batches_tracked``) always travel ``raw``. "fp32" sends every
tensor raw, in its own dtype. Top-k keeps ``max(1, ceil(topk_ratio * numel))`` values per tensor;
the caller keeps the residual if it wants error feedback.

Decoding checks every name, dtype, shape, size and index against `DecodeLimits` and raises only
`WireError`. torch and numpy are imported inside the functions, so `p2pfl.wire` imports without
them.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from p2pfl.wire._codec import (
    DEFAULT_LIMITS,
    DecodeLimits,
    _check_structure,
    array_header,
    bin_header,
    pack,
)
from p2pfl.wire._errors import WireError

if TYPE_CHECKING:
    import numpy as np
    import torch

FORMAT = "p2pfl.state_dict"
FORMAT_VERSION = 1
CODECS = ("fp32", "fp16", "bf16", "int8", "topk")
ENCODINGS = ("raw", "fp16", "bf16", "int8", "topk")
# wire dtype name -> (numpy storage dtype, bytes per element); bfloat16 is stored as its bits.
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("<f4", 4),
    "float64": ("<f8", 8),
    "float16": ("<f2", 2),
    "bfloat16": ("<i2", 2),
    "int8": ("i1", 1),
    "uint8": ("u1", 1),
    "int16": ("<i2", 2),
    "int32": ("<i4", 4),
    "int64": ("<i8", 8),
    "bool": ("?", 1),
}
FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})
MAX_NAME_CHARS = 512
FP16_MAX = 65504.0


def encode_state_dict(
    state: Mapping[str, torch.Tensor],
    codec: str = "fp32",
    *,
    topk_ratio: float = 0.01,
    topk_indices: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    """Encode a state_dict. Raises ValueError for an unknown codec or an unencodable tensor.

    ``topk_indices`` (codec "topk"): per floating tensor, the sorted flat indices to send instead
    of the largest magnitudes (how a delta codec sends a model's values where its update is
    largest); a tensor without an entry falls back to the largest magnitudes.
    """
    import torch

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if not 0.0 < topk_ratio <= 1.0:
        raise ValueError("topk_ratio must be in (0, 1]")
    if sys.byteorder != "little":
        raise RuntimeError("the tensor codec is implemented for little-endian hosts only")
    parts: list[bytes | memoryview] = [
        array_header(4),
        pack(FORMAT),
        pack(FORMAT_VERSION),
        pack(codec),
        array_header(len(state)),
    ]
    for name, tensor in state.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ValueError(f"tensor name must be a string of 1-{MAX_NAME_CHARS} chars: {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        tensor = tensor.detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype} is not supported ({', '.join(DTYPES)})")
        encoding = codec if dtype in FLOAT_DTYPES and codec != "fp32" else "raw"
        if (encoding, dtype) in (("fp16", "float16"), ("bf16", "bfloat16")):
            encoding = "raw"  # already in the codec's precision: send as is
        chosen = topk_indices.get(name) if topk_indices is not None else None
        data, extra = _encode_tensor(name, tensor, encoding, topk_ratio, chosen)
        parts.append(array_header(6))
        for field in (name, dtype, list(tensor.shape), encoding):
            parts.append(pack(field))
        parts += [bin_header(data.nbytes), data]
        if isinstance(extra, memoryview):
            parts += [bin_header(extra.nbytes), extra]
        else:
            parts.append(pack(extra))
    return b"".join(parts)


def _bytes_of(array: np.ndarray[Any, Any]) -> memoryview:
    return array.data.cast("B") if array.size else memoryview(b"")


def _encode_tensor(
    name: str,
    tensor: torch.Tensor,
    encoding: str,
    topk_ratio: float,
    chosen: torch.Tensor | None = None,
) -> tuple[memoryview, float | memoryview | None]:
    import torch

    if encoding == "raw":
        if tensor.dtype == torch.bfloat16:
            return _bytes_of(tensor.view(torch.int16).numpy()), None
        return _bytes_of(tensor.numpy()), None
    work = tensor if tensor.dtype == torch.float64 else tensor.to(torch.float32)
    if work.numel():
        array = work.numpy()  # numpy, single-threaded: see _quantize_int8
        peak = max(-float(array.min()), float(array.max()))  # NaN or inf make it non-finite
    else:
        peak = 0.0
    if not math.isfinite(peak):
        raise ValueError(f"{name}: non-finite values cannot use the lossy codec {encoding!r}")
    if encoding == "fp16":
        if peak > FP16_MAX:
            raise ValueError(f"{name}: values above {FP16_MAX} overflow fp16; use bf16 or fp32")
        return _bytes_of(tensor.to(torch.float16).numpy()), None
    if encoding == "bf16":
        return _bytes_of(tensor.to(torch.bfloat16).view(torch.int16).numpy()), None
    if encoding == "int8":
        scale = peak / 127.0
        if scale == 0.0:
            return _bytes_of(torch.zeros(work.shape, dtype=torch.int8).numpy()), 0.0
        return _bytes_of(_quantize_int8(work, scale)), scale
    # topk
    flat = tensor.reshape(-1)
    k = min(flat.numel(), max(1, math.ceil(topk_ratio * flat.numel())))
    if flat.numel() == 0:
        k = 0
    if chosen is not None:
        indices = chosen.reshape(-1).to(torch.int64)
        if indices.numel() and (
            int(indices.min()) < 0
            or int(indices.max()) >= flat.numel()
            or not bool((indices[1:] > indices[:-1]).all())
        ):
            raise ValueError(f"{name}: top-k indices must be strictly increasing and in range")
    else:
        indices = torch.topk(work.reshape(-1).abs(), k, sorted=False).indices.sort().values
    values = flat[indices]
    if values.dtype == torch.bfloat16:
        value_bytes = _bytes_of(values.view(torch.int16).numpy())
    else:
        value_bytes = _bytes_of(values.numpy())
    return value_bytes, _bytes_of(indices.to(torch.int32).numpy().astype("<u4"))


def _quantize_int8(work: torch.Tensor, scale: float) -> np.ndarray[Any, Any]:
    """``round(x * (1 / scale))`` clamped to [-127, 127], as int8; rounding half to even, in the
    tensor's precision (float32, or float64 for a float64 tensor).

    numpy, not torch: torch runs each of these element-wise passes on its intra-op thread pool,
    whose threads wait for one another; on a busy machine (other processes on the same cores)
    a 64 MiB model's passes took 0.6-1.5 s that way and 0.03 s in one thread
    (benchmarks/README.md, the transport section). The bytes are those torch's
    ``mul(1 / scale).round_().clamp_(-127, 127).to(torch.int8)`` gives
    (tests/wire/test_tensors.py compares them).
    """
    import numpy as np

    values = work.numpy()
    buffer = np.empty(values.shape, values.dtype)  # an array also for a 0-d tensor
    np.multiply(values, values.dtype.type(1.0 / scale), out=buffer)
    np.rint(buffer, out=buffer)
    np.clip(buffer, -127, 127, out=buffer)
    return buffer.astype(np.int8)


def decode_state_dict(
    data: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS
) -> dict[str, torch.Tensor]:
    """Decode `encode_state_dict` output; raises only `WireError` (never unpickles anything)."""
    return {name: tensor for name, (tensor, _) in _decode(data, limits, sparse=False).items()}


def decode_sparse_state_dict(
    data: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Like `decode_state_dict`, but a ``topk`` entry comes back as (values, flat indices)
    instead of a dense tensor with zeros; other entries as (tensor, None)."""
    return _decode(data, limits, sparse=True)


def _decode(
    data: bytes | bytearray | memoryview, limits: DecodeLimits, *, sparse: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    if len(data) > limits.max_frame_bytes:
        raise WireError("oversized", f"state_dict of {len(data)} bytes > {limits.max_frame_bytes}")
    view = memoryview(data).cast("B")
    _check_structure(view, limits)  # well-formed msgpack within limits: reads below cannot overrun
    reader = _Reader(view)
    if reader.array_len() != 4 or reader.str_() != FORMAT:
        raise WireError("malformed", f"not a {FORMAT} payload")
    version = reader.int_()
    if version != FORMAT_VERSION:
        raise WireError(
            "bad_version", f"state_dict format {version}, this node reads {FORMAT_VERSION}"
        )
    codec = reader.str_()
    if codec not in CODECS:
        raise WireError("bad_tensor", f"unknown codec {codec[:20]!r}")
    count = reader.array_len()
    if count > limits.max_tensors:
        raise WireError("oversized", f"{count} tensors > max_tensors {limits.max_tensors}")
    state: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    total = 0
    for _ in range(count):
        name, tensor, indices = _decode_entry(reader, limits, sparse)
        if name in state:
            raise WireError("bad_tensor", f"tensor {name[:60]!r} appears twice")
        total += tensor.numel()
        if total > limits.max_total_elements:
            raise WireError("oversized", f"more than {limits.max_total_elements} elements in total")
        state[name] = (tensor, indices)
    return state


def _decode_entry(
    reader: _Reader, limits: DecodeLimits, sparse: bool = False
) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    import numpy as np
    import torch

    if reader.array_len() != 6:
        raise WireError("malformed", "tensor entry is not an array of 6 fields")
    name = reader.str_()
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise WireError("bad_tensor", f"tensor name of {len(name)} chars")
    where = f"tensor {name[:60]!r}"
    dtype = reader.str_()
    if dtype not in DTYPES:
        raise WireError("bad_tensor", f"{where}: dtype {dtype[:20]!r} not allowed")
    ndim = reader.array_len()
    if ndim > limits.max_tensor_ndim:
        raise WireError("bad_tensor", f"{where}: {ndim} dimensions > {limits.max_tensor_ndim}")
    shape = [reader.int_() for _ in range(ndim)]
    if any(d < 0 for d in shape):
        raise WireError("bad_tensor", f"{where}: negative dimension in {shape}")
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise WireError("oversized", f"{where}: {numel} elements > {limits.max_tensor_elements}")
    encoding = reader.str_()
    if encoding not in ENCODINGS or (encoding != "raw" and dtype not in FLOAT_DTYPES):
        raise WireError("bad_tensor", f"{where}: encoding {encoding[:20]!r} invalid for {dtype}")
    data = reader.bin_()
    storage, itemsize = DTYPES[dtype]

    def expect(nbytes: int, what: str) -> None:
        if len(data) != nbytes:
            raise WireError(
                "bad_tensor", f"{where}: {what} has {len(data)} bytes, expected {nbytes}"
            )

    if encoding == "raw":
        reader.nil()
        expect(numel * itemsize, "data")
        values = np.frombuffer(data, storage, count=numel).copy()
        return name, _as_dtype(torch.from_numpy(values), dtype).reshape(shape), None
    if encoding in ("fp16", "bf16"):
        reader.nil()
        expect(numel * 2, "data")
        values = np.frombuffer(data, "<f2" if encoding == "fp16" else "<i2", count=numel).copy()
        tensor = torch.from_numpy(values)
        tensor = tensor if encoding == "fp16" else tensor.view(torch.bfloat16)
        return name, _cast(tensor, dtype).reshape(shape), None
    if encoding == "int8":
        scale = reader.float_()
        work = "<f8" if dtype == "float64" else "<f4"
        if not 0.0 <= scale <= float(np.finfo(work).max) / 127:  # also refuses NaN
            raise WireError("bad_tensor", f"{where}: int8 scale {scale} out of range")
        expect(numel, "data")
        # One pass: each int8 is cast to the working precision and multiplied, as
        # astype(work) * scale would in two.
        values = np.multiply(
            np.frombuffer(data, "i1", count=numel), np.array(scale, work), dtype=work
        )
        return name, _cast(torch.from_numpy(values), dtype).reshape(shape), None
    # topk
    indices_view = reader.bin_()
    k = len(indices_view) // 4
    if len(indices_view) % 4 or k > numel:
        raise WireError(
            "bad_tensor", f"{where}: {len(indices_view)} index bytes for {numel} elements"
        )
    expect(k * itemsize, "values")
    indices = np.frombuffer(indices_view, "<u4", count=k)
    if k and (int(indices.max()) >= numel or not bool(np.all(indices[1:] > indices[:-1]))):
        raise WireError("bad_tensor", f"{where}: top-k indices out of range or not strictly sorted")
    if sparse:
        kept = np.frombuffer(data, storage, count=k).copy()
        flat_indices = torch.from_numpy(indices.astype(np.int64))
        return name, _as_dtype(torch.from_numpy(kept), dtype), flat_indices
    dense = np.zeros(numel, storage)
    dense[indices] = np.frombuffer(data, storage, count=k)
    return name, _as_dtype(torch.from_numpy(dense), dtype).reshape(shape), None


def _as_dtype(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    import torch

    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _cast(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    import torch

    target = getattr(torch, dtype)
    return tensor if tensor.dtype == target else tensor.to(target)


class _Reader:
    """Reads the fixed tensor layout from msgpack already checked by `_check_structure`.

    Binaries come back as memoryviews into the input (no copy); a value of an unexpected type
    is ``WireError("malformed")``.
    """

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big")

    def _tag(self, what: str, *allowed: range | int) -> int:
        tag = self.buf[self.pos]
        for option in allowed:
            if tag == option if isinstance(option, int) else tag in option:
                self.pos += 1
                return tag
        raise WireError("malformed", f"expected {what} at byte {self.pos}, found 0x{tag:02x}")

    def array_len(self) -> int:
        tag = self._tag("an array", range(0x90, 0xA0), 0xDC, 0xDD)
        return tag & 0x0F if tag < 0xA0 else self._uint(2 if tag == 0xDC else 4)

    def str_(self) -> str:
        tag = self._tag("a string", range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB)
        n = tag & 0x1F if tag < 0xC0 else self._uint({0xD9: 1, 0xDA: 2, 0xDB: 4}[tag])
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError:
            raise WireError("malformed", "string is not UTF-8") from None

    def int_(self) -> int:
        tag = self._tag("an integer", range(0x00, 0x80), range(0xE0, 0x100), range(0xCC, 0xD4))
        if tag < 0x80:
            return tag
        if tag >= 0xE0:
            return tag - 0x100
        size = 1 << ((tag - 0xCC) % 4)
        return int.from_bytes(self._take(size), "big", signed=tag >= 0xD0)

    def float_(self) -> float:
        tag = self._tag("a float", 0xCA, 0xCB)
        return float(
            struct.unpack(">f" if tag == 0xCA else ">d", self._take(4 if tag == 0xCA else 8))[0]
        )

    def bin_(self) -> memoryview:
        tag = self._tag("a binary", 0xC4, 0xC5, 0xC6)
        return self._take(self._uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[tag]))

    def nil(self) -> None:
        self._tag("nil", 0xC0)
