"""Wire benchmarks: the cost of shipping a model, and a fuzz run of the decoders.

1. Encode + sign + verify + decode of an 8.6M-parameter state_dict (34 MB fp32) and of its int8
   form, next to the baseline measured in the same run: a plain bytes copy + SHA-256 of the same
   34 MB. Target: within 3x of the baseline.
2. A mutation fuzz of `unpack`, `EnvelopeVerifier.open` and `decode_state_dict`: valid frames
   and payloads with random bit flips, byte sets, insertions, deletions and truncations, plus pure
   random bytes. Reports inputs/s and crashes (any exception other than WireError). Target: 0.

Run: python benchmarks/bench_wire.py [--inputs N] [--repeat R]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import random
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch

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


def model_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "l1.weight": (2048, 2048),
        "l1.bias": (2048,),
        "l2.weight": (2048, 2048),
        "l2.bias": (2048,),
        "head.weight": (100, 2048),
        "head.bias": (100,),
    }
    return {name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes.items()}


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_model(repeat: int) -> None:
    state = model_state()
    params = sum(t.numel() for t in state.values())
    raw = b"".join(t.numpy().tobytes() for t in state.values())
    alice = NodeIdentity.from_seed(b"a" * 32)

    def baseline() -> None:
        copy = bytes(bytearray(raw))
        hashlib.sha256(copy).digest()

    base = best(baseline, repeat)
    print(f"model: {params / 1e6:.2f}M parameters, {len(raw) / 1e6:.1f} MB fp32")
    print(f"baseline  bytes copy + sha256             {base * 1e3:8.1f} ms")
    for codec in ("fp32", "int8"):
        stages: dict[str, list[float]] = collections.defaultdict(list)
        for seq in range(1, repeat + 1):
            verifier = EnvelopeVerifier(is_trusted=lambda key: True)
            t0 = time.perf_counter()
            blob = encode_state_dict(state, codec)
            t1 = time.perf_counter()
            frame = seal(alice, kind="model", body={"weights": blob}, seq=seq, now=NOW)
            t2 = time.perf_counter()
            envelope = verifier.open(frame, now=NOW)
            t3 = time.perf_counter()
            decoded = decode_state_dict(envelope.body["weights"])
            t4 = time.perf_counter()
            for name, value in (("encode", t1 - t0), ("seal", t2 - t1), ("open", t3 - t2)):
                stages[name].append(value)
            stages["decode"].append(t4 - t3)
            stages["total"].append(t4 - t0)
        assert decoded.keys() == state.keys()
        if codec == "fp32":
            assert all(torch.equal(decoded[k], v) for k, v in state.items())
        total = min(stages["total"])
        detail = "  ".join(
            f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in stages.items() if k != "total"
        )
        print(
            f"{codec:5}     encode+sign+verify+decode       {total * 1e3:8.1f} ms"
            f"  = {total / base:4.2f}x baseline (target <= 3x); frame {len(frame) / 1e6:.1f} MB"
        )
        print(f"          median ms: {detail}")


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[pos] = rng.choice(
                (
                    0x00,
                    0x7F,
                    0x80,
                    0x8F,
                    0x9F,
                    0xC1,
                    0xC4,
                    0xC6,
                    0xC7,
                    0xD4,
                    0xDC,
                    0xDD,
                    0xDE,
                    0xDF,
                    0xFF,
                    rng.randrange(256),
                )
            )
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 4:
            del buf[pos:]
    return bytes(buf)


def fuzz(n_inputs: int, seed: int) -> int:
    rng = random.Random(seed)
    alice = NodeIdentity.from_seed(b"a" * 32)
    small = {
        "w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]),
        "b": torch.tensor([0.5]),
        "n": torch.tensor(3),
        "h": torch.tensor([1.0, 2.0]).bfloat16(),
    }
    tensor_blobs = [
        encode_state_dict(small, c, topk_ratio=0.5)
        for c in ("fp32", "fp16", "bf16", "int8", "topk")
    ]
    frames = [
        seal(alice, kind="model", body={"weights": tensor_blobs[0], "round": 4}, seq=9, now=NOW),
        seal(alice, kind="hello", body={"peers": ["a", "b"], "t": 1.5, "x": None}, seq=1, now=NOW),
    ]
    plain = [pack({"a": [1, {"b": "c"}], "d": b"xyz", "e": [[[-1]]], "f": 1e10, "g": True})]
    verifier = EnvelopeVerifier(is_trusted=lambda key: True)
    reasons: collections.Counter[str] = collections.Counter()
    crashes = 0
    targets: list[tuple[Callable[[bytes], object], list[bytes]]] = [
        (unpack, plain + frames + tensor_blobs),
        (lambda d: verifier.open(d, now=NOW), frames),
        (decode_state_dict, tensor_blobs),
    ]
    warnings.simplefilter("error")  # a warning (e.g. numpy overflow) counts as a crash too
    start = time.perf_counter()
    for i in range(n_inputs):
        decoder, seeds = targets[i % 3]
        data = rng.randbytes(rng.randint(0, 64)) if i % 50 == 0 else mutate(rng.choice(seeds), rng)
        try:
            decoder(data)
            reasons["accepted"] += 1
        except WireError as exc:
            reasons[exc.reason] += 1
        except Exception:
            crashes += 1
            if crashes <= 3:
                print(f"CRASH on input {data.hex()}:")
                traceback.print_exc()
    elapsed = time.perf_counter() - start
    print(
        f"fuzz: {n_inputs} inputs in {elapsed:.1f} s = {n_inputs / elapsed:,.0f} inputs/s; "
        f"crashes: {crashes} (target 0)"
    )
    print("      outcomes: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    return crashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="fuzz inputs (default 1e6)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_model(args.repeat)
    return 1 if fuzz(args.inputs, args.seed) else 0


if __name__ == "__main__":
    sys.exit(main())
