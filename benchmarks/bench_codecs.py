"""Does a codec keep accuracy at fewer bytes? The virtual engine, one paired run per codec.

Each codec runs the same scenario with the same setup names (so every random draw is the same
and only the codec differs): the scenario's task, network and training, ``--rounds`` rounds per
node (gossip: trainings), one setup per protocol. The bytes are every model sent, envelopes
included, as the engine counts them (``learning.codecs.LinkCodecs``, the class the daemon's
driver runs). fp32 is the baseline of the same run; the targets are issue 13's: int8 within 0.5
point at >= 3.9x fewer bytes, top-k within 1 point at >= 20x.

``topk`` is refused by every setup (``learning.codecs.REFUSED``): this benchmark lifts the
refusal for its own runs, to measure the figures the refusal cites.

Run: PYTHONPATH=. python benchmarks/bench_codecs.py [--scenario simulations/digits-10-noniid.toml]
     [--rounds 30] [--codecs fp32,int8,topk] [--protocols fedavg,server-free,gossip] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import tomllib
from typing import Any
from unittest import mock

from p2pfl.learning import codecs
from p2pfl.sim import virtual
from p2pfl.sim.scenario import parse_scenario

TARGETS = {"int8": (0.5, 3.9), "topk": (1.0, 20.0)}
"""codec -> (most points of the primary metric behind fp32, least factor of fewer bytes)."""


def scenario_for(path: str, codec: str, protocols: list[str], rounds: int) -> Any:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    by_protocol = {s["protocol"]: s for s in raw["setup"]}
    raw["stop"] = {"time": 1e6, "rounds": rounds}
    raw["setup"] = [
        {k: v for k, v in by_protocol[p].items() if k != "stop"} | {"name": p, "codec": codec}
        for p in protocols
    ]
    return parse_scenario(raw, path)


def run(path: str, codec: str, protocols: list[str], rounds: int) -> dict[str, dict[str, Any]]:
    refusal_lifted = mock.patch.multiple(codecs, CODECS=(*codecs.CODECS, codec), REFUSED={})
    with refusal_lifted if codec in codecs.REFUSED else contextlib.nullcontext():
        scenario = scenario_for(path, codec, protocols, rounds)
    results = virtual.run(scenario)
    out = {}
    for setup in results.setups:
        out[setup.name] = {
            "metric": setup.final[results.primary_metric],
            "bytes": setup.bytes_sent,
            "messages": sum(int(n.extra["messages_sent"]) for n in setup.nodes),
            "dropped": sum(sum(n.extra["dropped"].values()) for n in setup.nodes),
            "wall_s": setup.wall_time_s,
        }
    out["_"] = {"metric_name": results.primary_metric, "higher": results.higher_is_better}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="simulations/digits-10-noniid.toml")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--codecs", default="fp32,int8,topk")
    parser.add_argument("--protocols", default="fedavg,server-free,gossip")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    chosen = args.codecs.split(",")
    if chosen[0] != "fp32":
        chosen = ["fp32", *[c for c in chosen if c != "fp32"]]
    protocols = args.protocols.split(",")
    print(f"{args.scenario}, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for codec in chosen:
        started = time.perf_counter()
        figures[codec] = run(args.scenario, codec, protocols, args.rounds)
        print(f"  {codec}: {time.perf_counter() - started:.0f} s", flush=True)
    info = figures["fp32"].pop("_")
    for codec in chosen[1:]:
        figures[codec].pop("_")
    sign = 1.0 if info["higher"] else -1.0
    name = info["metric_name"]
    # Accuracy: points behind fp32 (the targets' unit); any other metric: % worse than fp32.
    unit = "points" if name == "accuracy" else "%"
    columns = ["protocol", "codec", name, f"behind fp32 ({unit})", "MB", "fewer bytes"]
    print(f"\n| {' | '.join(columns)} | target | met |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for protocol in protocols:
        base = figures["fp32"][protocol]
        for codec in chosen:
            got = figures[codec][protocol]
            behind = sign * (base["metric"] - got["metric"]) * 100
            if unit != "points":
                behind /= abs(base["metric"])
            fewer = base["bytes"] / got["bytes"]
            target = TARGETS.get(codec) if unit == "points" else None
            met = ""
            if target is not None:
                met = "yes" if behind <= target[0] and fewer >= target[1] else "no"
            goal = "" if target is None else f"<= {target[0]} pt, >= {target[1]}x"
            print(
                f"| {protocol} | {codec} | {got['metric']:.4f} | {behind:+.2f} | "
                f"{got['bytes'] / 1e6:.2f} | {fewer:.2f}x | {goal} | {met} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scenario": args.scenario, "rounds": args.rounds, **figures}, f, indent=1)


if __name__ == "__main__":
    main()
