"""State_dict codecs: lossless fp32, documented error bounds, strict validated decoding."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from p2pfl.wire import DecodeLimits, WireError, decode_state_dict, encode_state_dict, pack, unpack


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 64, generator=g) * 0.05,
        "fc.bias": torch.randn(10, generator=g),
        "bn.num_batches_tracked": torch.tensor(17),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "double": torch.randn(5, generator=g, dtype=torch.float64),
        "half": torch.randn(7, generator=g).half(),
        "brain": torch.randn(7, generator=g).bfloat16(),
    }


def test_fp32_round_trip_is_bit_exact_for_every_dtype(state: dict[str, torch.Tensor]) -> None:
    decoded = decode_state_dict(encode_state_dict(state, "fp32"))
    assert list(decoded) == list(state)
    for name, tensor in state.items():
        assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape
        assert torch.equal(decoded[name], tensor), name
    decoded["fc.weight"].mul_(2)  # decoded tensors own writable memory (no read-only warning)


def test_non_contiguous_and_grad_tensors_encode(state: dict[str, torch.Tensor]) -> None:
    w = torch.randn(8, 4, requires_grad=True)
    decoded = decode_state_dict(encode_state_dict({"t": w.t(), "w": w}))
    assert torch.equal(decoded["t"], w.detach().t()) and torch.equal(decoded["w"], w.detach())


def _floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.dtype == torch.float32}


def test_fp16_error_within_documented_bound(state: dict[str, torch.Tensor]) -> None:
    state["tiny"] = torch.tensor([1e-7, -3e-6, 6e-5, 0.0])
    decoded = decode_state_dict(encode_state_dict(state, "fp16"))
    for name, x in _floats(state).items():
        err = (decoded[name].double() - x.double()).abs()
        assert bool((err <= torch.clamp(x.double().abs() * 2**-11, min=2**-25)).all()), name
        assert decoded[name].dtype == torch.float32
    assert torch.equal(decoded["half"], state["half"])  # already fp16: sent as is
    assert torch.equal(decoded["bn.num_batches_tracked"], state["bn.num_batches_tracked"])


def test_fp16_refuses_values_that_would_overflow() -> None:
    with pytest.raises(ValueError, match="overflow fp16"):
        encode_state_dict({"big": torch.tensor([70000.0])}, "fp16")


def test_bf16_error_within_documented_bound(state: dict[str, torch.Tensor]) -> None:
    decoded = decode_state_dict(encode_state_dict(state, "bf16"))
    for name, x in _floats(state).items():
        err = (decoded[name].double() - x.double()).abs()
        assert bool((err <= torch.clamp(x.double().abs() * 2**-8, min=2**-133)).all()), name
    assert torch.equal(decoded["brain"], state["brain"])


def test_int8_error_within_documented_bound(state: dict[str, torch.Tensor]) -> None:
    data = encode_state_dict(state, "int8")
    decoded = decode_state_dict(data)
    for name, x in _floats(state).items():
        if x.numel() == 0:
            continue
        bound = float(x.abs().max()) / 254 * (1 + 1e-6)
        assert float((decoded[name] - x).abs().max()) <= bound, name
    assert len(data) < len(encode_state_dict(state, "fp32")) / 3


def test_int8_of_all_zero_tensor_is_exact() -> None:
    decoded = decode_state_dict(encode_state_dict({"z": torch.zeros(5)}, "int8"))
    assert torch.equal(decoded["z"], torch.zeros(5))


def test_topk_keeps_largest_values_exactly_and_bounds_the_rest(
    state: dict[str, torch.Tensor],
) -> None:
    decoded = decode_state_dict(encode_state_dict(state, "topk", topk_ratio=0.1))
    for name, x in _floats(state).items():
        if x.numel() == 0:
            continue
        y = decoded[name]
        kept = y != 0
        k = max(1, math.ceil(0.1 * x.numel()))
        assert int(kept.sum()) == k, name
        assert torch.equal(y[kept], x[kept])
        smallest_kept = float(x[kept].abs().min())
        assert float((x - y).abs().max()) <= smallest_kept, name


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "topk"])
def test_every_codec_output_is_plain_bounded_msgpack(
    codec: str, state: dict[str, torch.Tensor]
) -> None:
    data = encode_state_dict(state, codec)
    fmt, version, name, entries = unpack(data)
    assert (fmt, version, name, len(entries)) == ("p2pfl.state_dict", 1, codec, len(state))


def _entry_blob(*entry: object, codec: str = "fp32") -> bytes:
    return pack(["p2pfl.state_dict", 1, codec, [list(entry)]])


F4 = b"\x00\x00\x80\x3f"  # 1.0 as float32


@pytest.mark.parametrize(
    ("blob", "limits", "reason"),
    [
        (_entry_blob("w", "float32", [2], "raw", F4, None), None, "bad_tensor"),  # too short
        (_entry_blob("w", "float32", [1], "raw", F4 * 2, None), None, "bad_tensor"),  # too long
        (_entry_blob("w", "object", [1], "raw", F4, None), None, "bad_tensor"),
        (_entry_blob("w", "float32", [-1], "raw", b"", None), None, "bad_tensor"),
        (_entry_blob("w", "float32", [1] * 9, "raw", F4, None), None, "bad_tensor"),
        (_entry_blob("w", "int64", [1], "int8", b"\x01", 0.5), None, "bad_tensor"),
        (_entry_blob("w", "float32", [1], "int8", b"\x01", float("nan")), None, "bad_tensor"),
        (_entry_blob("w", "float32", [1], "int8", b"\x7f", 1e300), None, "bad_tensor"),  # -> inf
        (_entry_blob("w", "float32", [1], "pickle", F4, None), None, "bad_tensor"),
        (_entry_blob("w", "float32", [4], "topk", F4, b"\x07\x00\x00\x00"), None, "bad_tensor"),
        (_entry_blob("w", "float32", [9], "topk", F4 * 2, b"\x02\0\0\0" * 2), None, "bad_tensor"),
        (
            _entry_blob("w", "float32", [1000, 1000], "raw", F4, None),
            DecodeLimits(max_tensor_elements=10**5),
            "oversized",
        ),
        (_entry_blob("w", "float32", [1], "raw", F4, 1.5), None, "malformed"),
        (_entry_blob("w", "float32", 1, "raw", F4, None), None, "malformed"),
        (_entry_blob("w", "float32", [1], "raw", F4, None, codec="gzip"), None, "bad_tensor"),
        (pack(["p2pfl.state_dict", 2, "fp32", []]), None, "bad_version"),
        (pack(["other", 1, "fp32", []]), None, "malformed"),
        (
            pack(["p2pfl.state_dict", 1, "fp32", [["w", "float32", [1], "raw", F4, None]] * 2]),
            None,
            "bad_tensor",
        ),  # duplicate name
        (
            pack(["p2pfl.state_dict", 1, "fp32", [["w", "float32", [1], "raw", F4, None]] * 3]),
            DecodeLimits(max_tensors=2),
            "oversized",
        ),
        (_entry_blob("w", "float32", [1], "raw", F4, None)[:-3], None, "truncated"),
    ],
)
def test_invalid_tensor_payload_is_rejected_with_reason(
    blob: bytes, limits: DecodeLimits | None, reason: str
) -> None:
    with pytest.raises(WireError) as info:
        decode_state_dict(blob, limits or DecodeLimits())
    assert info.value.reason == reason


def test_decoder_never_unpickles() -> None:
    # A torch.save file (a pickle) is not a p2pfl.state_dict: rejected, nothing executed.
    import io

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    with pytest.raises(WireError):
        decode_state_dict(buffer.getvalue())


def test_envelope_code_imports_without_torch() -> None:
    code = (
        "import sys; import p2pfl.wire, p2pfl.trust;"
        "from p2pfl.identity import NodeIdentity; from p2pfl.wire import seal;"
        "seal(NodeIdentity.generate(), kind='k', body=None, seq=1, now=1.0);"
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_state_dict_travels_in_an_envelope(state: dict[str, torch.Tensor]) -> None:
    from p2pfl.identity import NodeIdentity
    from p2pfl.wire import EnvelopeVerifier, seal

    alice = NodeIdentity.from_seed(b"a" * 32)
    big = {**state, "big": torch.randn(300, 300)}  # > 64 KiB: referenced, not copied, by seal
    frame = seal(alice, kind="model", body={"w": encode_state_dict(big), "r": 1}, seq=1, now=5.0)
    envelope = EnvelopeVerifier(is_trusted=lambda k: True).open(frame, now=5.0)
    decoded = decode_state_dict(envelope.body["w"])
    assert all(torch.equal(decoded[k], v) for k, v in big.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_int8_bytes_and_values_are_torchs_elementwise_formula(dtype: torch.dtype) -> None:
    # The int8 codec quantizes and dequantizes in numpy (one thread); the bytes must be those of
    # torch's mul(1 / scale).round_().clamp_(-127, 127) in the working precision, ties (x.5,
    # rounded half to even) and both extremes included, and decoding int8 * scale in it.
    torch.manual_seed(3)
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ties = torch.arange(-127, 128, dtype=torch.float64) + 0.5  # x.5 after the division
    tensors = {
        "randn": torch.randn(3000, dtype=torch.float64) * 7,
        "ties": torch.cat([ties.clamp(-127, 127), torch.tensor([127.0, -127.0])]),
        "one_sided": torch.rand(513, dtype=torch.float64) * 1e-3,
        "tiny": torch.randn(64, dtype=torch.float64) * 1e-30,
        "scalar": torch.tensor(-2.5, dtype=torch.float64),
    }
    for name, values in tensors.items():
        tensor = values.to(dtype)
        encoded = encode_state_dict({name: tensor}, "int8")
        work = tensor.to(work_dtype)
        low, high = torch.aminmax(work)
        scale = max(-float(low), float(high)) / 127.0
        if scale == 0.0:  # e.g. 1e-30 in float16: all zeros, tested above
            continue
        expected = work.mul(1.0 / scale).round_().clamp_(-127, 127).to(torch.int8)
        entry = unpack(encoded)[3][0]
        assert entry[3] == "int8" and entry[5] == scale, name
        assert bytes(entry[4]) == expected.numpy().tobytes(), name
        decoded = decode_state_dict(encoded)[name]
        assert decoded.dtype == dtype
        reference = (expected.to(work_dtype) * torch.tensor(scale, dtype=work_dtype)).to(dtype)
        assert torch.equal(decoded, reference), name
