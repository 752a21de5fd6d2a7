"""Top-k 1 % of the update on the round's reference, with error feedback, in FedAvg on digits.

A direct FedAvg loop (every node trains each round, as FedAvgLearner's aggregator and
participants do) with real training, and the wire codecs on both directions:

- ``fp32``: the global model down, each trained model up, dense.
- ``topk-update``: up, ``UpdateEncoder`` (top-k of model - global + residual, per node, the
  aggregator's own update included); the aggregator averages ``decode_update`` results, so the
  global changes only where some update was sent; down, ``DeltaEncoder(topk_ratio=None)`` per
  participant (exactly the changed coordinates, lossless).

Prints accuracy of the final global model and bytes in both directions.

Run: PYTHONPATH=. python benchmarks/bench_fedavg_topk.py [--rounds 30] [--partition dirichlet]
"""

from __future__ import annotations

import argparse
import time

import torch

from p2pfl.ml import load_task
from p2pfl.wire import (
    DeltaDecoder,
    DeltaEncoder,
    UpdateEncoder,
    decode_state_dict,
    decode_update,
    encode_state_dict,
)

StateDict = dict[str, torch.Tensor]


def run(codec: str, args: argparse.Namespace) -> tuple[float, int, int]:
    task = load_task(
        "digits", n_nodes=args.nodes, partition=args.partition, alpha=args.alpha, seed=args.seed
    )
    model = task.make_model()
    glob: StateDict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = [task.node_data(i, args.nodes) for i in range(args.nodes)]
    up_codec = [UpdateEncoder(topk_ratio=args.ratio) for _ in range(args.nodes)]
    # Node 0 aggregates; the others hold the initial model too (same seed), so links start there.
    down = [(DeltaEncoder(topk_ratio=None, initial=glob), DeltaDecoder(initial=glob))]
    down += [
        (DeltaEncoder(topk_ratio=None, initial=glob), DeltaDecoder(initial=glob))
        for _ in range(args.nodes - 2)
    ]
    up_bytes = down_bytes = 0
    for _ in range(args.rounds):
        held = [glob]  # what each participant holds of the global model
        for encoder, decoder in down:
            raw = encoder.encode(glob) if codec == "topk-update" else encode_state_dict(glob)
            down_bytes += len(raw)
            held.append(decoder.decode(raw) if codec == "topk-update" else decode_state_dict(raw))
        received = []
        for i in range(args.nodes):
            model.load_state_dict(held[i])
            task.train(model, data[i], epochs=args.epochs)
            trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if codec == "topk-update":
                raw = up_codec[i].encode(trained, held[i])
                received.append(decode_update(raw, glob))
            else:
                raw = encode_state_dict(trained)
                received.append(decode_state_dict(raw))
            if i:  # the aggregator's own update does not travel
                up_bytes += len(raw)
        glob = {
            k: sum(r[k] for r in received) / len(received) if v.is_floating_point() else v
            for k, v in glob.items()
        }
    model.load_state_dict(glob)
    return task.evaluate(model)["accuracy"], up_bytes, down_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"digits FedAvg, {args.nodes} nodes, {args.rounds} rounds, {args.partition}, "
        f"top-k ratio {args.ratio}"
    )
    print(f"{'codec':<12} {'accuracy':>9} {'bytes up':>11} {'bytes down':>11} {'seconds':>8}")
    for codec in ("fp32", "topk-update"):
        start = time.perf_counter()
        accuracy, up, down = run(codec, args)
        print(f"{codec:<12} {accuracy:9.4f} {up:11d} {down:11d} {time.perf_counter() - start:8.1f}")


if __name__ == "__main__":
    main()
