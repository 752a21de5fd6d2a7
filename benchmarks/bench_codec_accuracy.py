"""Does a codec keep accuracy? Gossip learning on digits with each codec on every link.

A direct loop of ``GossipLearner`` machines (no engine, no daemon): every ``Send`` is encoded
with the codec under test and decoded at the receiver, as the daemon's driver does; training is
real (``p2pfl.ml`` digits task). Codecs:

- ``fp32``: the whole model, lossless.
- ``topk-raw``: ``encode_state_dict(..., "topk")``, 1 % of the *weights*, zeros for the rest.
- ``topk-delta``: ``DeltaEncoder`` per link, 1 % of the *update* with error feedback, links
  starting from the task's initial model (keyframe every 64 messages).
- ``int8``: for reference.

Prints final mean accuracy over the nodes and the bytes sent per codec. With ``--attack``, node
``n00`` is an insider: everything it sends is its model negated and scaled by 1e6 ("scale",
gossip: with its true age + 1) or claims an age / round of 2**53 ("inflate"; FedAvg: it also
sends a global model of that round to everyone), and the accuracy is that of the honest nodes
(compare ``--aggregation mean`` with ``default``, the machines' robust rule). ``--protocol``
server-free / fedavg (n01 aggregates) run the same loop without codecs.

Run: PYTHONPATH=. python benchmarks/bench_codec_accuracy.py [--nodes 4] [--rounds 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import torch

from p2pfl.ml import StateDictOps, load_task
from p2pfl.protocols import (
    FedAvgConfig,
    FedAvgLearner,
    GlobalModel,
    GossipConfig,
    GossipLearner,
    GossipModel,
    MessageReceived,
    PeerUp,
    RoundUpdate,
    Send,
    ServerFreeConfig,
    ServerFreeLearner,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols._messages import MAX_ROUND
from p2pfl.wire import DeltaDecoder, DeltaEncoder, decode_state_dict, encode_state_dict

StateDict = dict[str, torch.Tensor]
Link = tuple[Callable[[StateDict], bytes], Callable[[bytes], StateDict]]


def make_link(codec: str, ratio: float, initial: StateDict) -> Link:
    if codec == "topk-delta":
        # Every node builds the task's initial model from the seed: the links start from it.
        encoder = DeltaEncoder(topk_ratio=ratio, initial=initial)
        decoder = DeltaDecoder(initial=initial)
        return encoder.encode, decoder.decode
    name = "topk" if codec == "topk-raw" else codec
    return (lambda s: encode_state_dict(s, name, topk_ratio=ratio)), decode_state_dict


def attacked(message: Any, attack: str) -> Any:
    """What the insider sends instead: the model negated and scaled by 1e6 with age + 1
    ("scale"), or its model with an age or round of 2**53 ("inflate")."""
    if attack == "scale":
        weights = {k: -1e6 * v if v.is_floating_point() else v for k, v in message.weights.items()}
        message = dataclasses.replace(message, weights=weights)
        if isinstance(message, GossipModel):
            message = dataclasses.replace(message, age=message.age + 1)
        return message
    if isinstance(message, GossipModel):
        return dataclasses.replace(message, age=MAX_ROUND)
    if isinstance(message, RoundUpdate):
        return dataclasses.replace(message, round=MAX_ROUND)
    return message


def run(codec: str, args: argparse.Namespace) -> tuple[float, int, int]:
    torch.manual_seed(args.seed)
    task = load_task(
        args.task, n_nodes=args.nodes, partition=args.partition, alpha=args.alpha, seed=args.seed
    )
    model = task.make_model()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = [task.node_data(i, args.nodes) for i in range(args.nodes)]
    ids = [f"n{i:02d}" for i in range(args.nodes)]
    settings: dict[str, Any] = {
        "budget": args.epochs,
        "max_rounds": args.rounds,
    }
    if args.aggregation != "default":
        settings["aggregation"] = args.aggregation
    if args.aggregation == "clip":
        settings["clip_scale"] = args.clip_scale
    machines: list[Any] = []
    for i in range(args.nodes):
        rng, ops = random.Random(f"{args.seed}:{i}"), StateDictOps()
        if args.protocol == "gossip":
            config = GossipConfig(period=1.0, jitter=0.1, **settings)
            machines.append(GossipLearner(ids[i], initial, ops, rng, config))
        elif args.protocol == "server-free":
            sf = ServerFreeConfig(round_timeout=5.0, **settings)
            machines.append(ServerFreeLearner(ids[i], initial, ops, rng, sf))
        else:  # the attacker n00 must not be the aggregator: n01 is
            fa = FedAvgConfig(round_timeout=5.0, aggregator=ids[1], **settings)
            machines.append(FedAvgLearner(ids[i], initial, ops, rng, fa))
    links = {(a, b): make_link(codec, args.ratio, initial) for a in ids for b in ids if a != b}
    encoders = {(a, b): DeltaEncoder(topk_ratio=args.ratio, initial=initial) for a, b in links}
    decoders = {(a, b): DeltaDecoder(initial=initial) for a, b in links}
    queue: list[tuple[float, int, int, Any]] = []
    seq = itertools.count()
    sent_bytes = messages = 0

    def perform(i: int, actions: list[Any], now: float) -> None:
        nonlocal sent_bytes, messages
        for action in actions:
            if isinstance(action, Send):
                j = ids.index(action.peer)
                message = action.message
                if i == 0 and args.attack != "none":
                    message = attacked(message, args.attack)
                    if args.protocol == "fedavg" and args.attack == "inflate":
                        claim = GlobalModel(MAX_ROUND, message.weights)
                        heapq.heappush(
                            queue, (now + 0.01, next(seq), j, MessageReceived(ids[i], claim))
                        )
                if args.protocol != "gossip":  # the codecs are measured on gossip only
                    heapq.heappush(
                        queue, (now + 0.01, next(seq), j, MessageReceived(ids[i], message))
                    )
                    continue
                action = Send(action.peer, message)
                if codec == "none":  # baseline: nothing arrives, every node learns alone
                    raw, weights = b"", machines[j].model
                elif codec == "topk-relative":
                    raw = encoders[(ids[i], ids[j])].encode(action.message.weights)
                    copy_of_sender = decoders[(ids[i], ids[j])].decode(raw)
                    # What the sender holds of the receiver's model (the j -> i link's reference):
                    # the sender's model relative to it, applied to the receiver's own model.
                    copy_of_receiver = encoders[(ids[j], ids[i])].reference
                    assert copy_of_receiver is not None
                    own = machines[j].model
                    weights = {
                        k: own[k] + (copy_of_sender[k] - copy_of_receiver[k])
                        if own[k].is_floating_point()
                        else copy_of_sender[k]
                        for k in own
                    }
                else:
                    encode, decode = links[(ids[i], action.peer)]
                    raw = encode(action.message.weights)
                    weights = decode(raw)
                sent_bytes += len(raw)
                messages += 1
                message = dataclasses.replace(action.message, weights=weights)
                heapq.heappush(queue, (now + 0.01, next(seq), j, MessageReceived(ids[i], message)))
            elif isinstance(action, Train):
                model.load_state_dict(action.weights)
                report = task.train(model, data[i], epochs=action.budget)
                trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
                heapq.heappush(queue, (now + 0.2, next(seq), i, TrainingDone(trained, report)))
            elif isinstance(action, SetTimer) and action.at is not None:
                heapq.heappush(queue, (action.at, next(seq), i, TimerFired()))

    for i, machine in enumerate(machines):
        for peer in ids:
            machine.handle(PeerUp(peer), 0.0)
        perform(i, machine.handle(Start(), 0.0), 0.0)
    while queue and not all(m.finished for m in machines):
        now, _, i, event = heapq.heappop(queue)
        if machines[i].finished:
            continue
        perform(i, machines[i].handle(event, now), now)
    accuracies = []
    for machine in machines[1:] if args.attack != "none" else machines:
        model.load_state_dict(machine.model)
        accuracies.append(task.evaluate(model)["accuracy"])
    return sum(accuracies) / len(accuracies), sent_bytes, messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30, help="trainings per node")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--aggregation", default="mean", help='"default": the machine\'s own')
    parser.add_argument("--clip-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codecs", default="fp32,topk-raw,topk-delta,int8")
    parser.add_argument("--attack", choices=("none", "scale", "inflate"), default="none")
    parser.add_argument("--protocol", choices=("gossip", "server-free", "fedavg"), default="gossip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{args.task}, {args.nodes} {args.protocol} nodes, {args.rounds} rounds/trainings each, "
        f"{args.partition}, aggregation {args.aggregation}, top-k ratio {args.ratio}, "
        f"attack {args.attack}"
    )
    print(f"{'codec':<12} {'accuracy':>9} {'bytes sent':>12} {'per message':>12} {'seconds':>8}")
    for codec in args.codecs.split(","):
        start = time.perf_counter()
        accuracy, sent, messages = run(codec, args)
        print(
            f"{codec:<12} {accuracy:9.4f} {sent:12d} {sent // max(messages, 1):12d} "
            f"{time.perf_counter() - start:8.1f}"
        )


if __name__ == "__main__":
    main()
