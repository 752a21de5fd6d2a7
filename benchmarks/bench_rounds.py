"""Where a FedAvg round's time goes with 10 real daemons (issue 16, part 3).

Starts the scenario ``peers_digits_fedavg.toml`` (10 daemons, digits, FedAvg) as the processes
engine does (a :class:`~p2pfl.sim.processes.DaemonCluster` in a bridged private network, forked
daemons), waits until the rounds run, then watches ``--rounds`` rounds: every 20 ms it reads
each daemon's status; at the start and end of the window it reads the daemons' counters
(training seconds, protocol seconds = encoding, signing, verifying, decoding; bytes) and
``/proc`` CPU time per process and per thread of the aggregator.

Printed: wall per round; per round, the aggregator's and the clients' (mean) training and
protocol seconds; the bytes per round and what they take at the measured link rate; CPU-seconds
per round of all daemons together against the cores the machine has; the aggregator's busiest
threads. Target (issue 16): a round <= 2x the sum of its training, encoding, signing and transfer.

Run (root): ``.venv/bin/python benchmarks/bench_rounds.py [--rounds 20]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from p2pfl.sim.netns import BridgedNetwork
from p2pfl.sim.processes import DaemonCluster, _cluster_spec
from p2pfl.sim.scenario import load_scenario

SCENARIO = Path(__file__).with_name("peers_digits_fedavg.toml")
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(path: str) -> float:
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _threads(pid: int) -> dict[str, float]:
    """CPU-seconds by thread: the daemon's main (trio) thread, its other threads by name."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            role = "main (trio)" if task.name == str(pid) else name
            if role.startswith("node-") or role.startswith("python"):
                role = "asyncio bridge (aiortc)"  # the only other thread named after the process
            out[f"{role}/{task.name}"] = _cpu(str(task / "stat"))
        except OSError:
            pass
    return out


def _by_role(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    roles: dict[str, float] = {}
    for key, value in after.items():
        role = key.rsplit("/", 1)[0]
        roles[role] = roles.get(role, 0.0) + value - before.get(key, 0.0)
    return roles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds in the measured window")
    parser.add_argument("--warmup", type=int, default=3, help="rounds before the window")
    args = parser.parse_args()
    scenario = load_scenario(SCENARIO)
    spec = _cluster_spec(scenario, scenario.setups[0])
    total = scenario.stop.rounds or 0  # the daemons stop after this many rounds
    if args.warmup + args.rounds + 2 > total:
        raise SystemExit(f"--warmup + --rounds must stay 2 below the scenario's {total} rounds")
    with (
        tempfile.TemporaryDirectory(prefix="p2pfl-rounds-", dir="/tmp") as tmp,
        BridgedNetwork(spec.n_nodes) as network,
        DaemonCluster(Path(tmp), spec, network) as cluster,
    ):
        cluster.start_all()
        n = spec.n_nodes
        deadline = time.monotonic() + 300
        while True:
            statuses = [cluster.status(i) for i in range(n)]
            if all(s is not None and s.round >= args.warmup for s in statuses):
                break
            if time.monotonic() > deadline:
                raise SystemExit("no rounds after 300 s:\n" + cluster.log_tail(0))
            time.sleep(0.05)
        pids = [node.process.pid for node in cluster.nodes]  # type: ignore[union-attr]
        first = [s for s in statuses if s is not None]
        # The aggregator: the node every other one follows; the one that sent the most bytes.
        agg = max(range(n), key=lambda i: first[i].bytes_out)
        r0 = min(s.round for s in first)
        end = min(r0 + args.rounds, total)
        cpu0 = [_cpu(f"/proc/{p}/stat") for p in pids]
        threads0 = [_threads(p) for p in pids]
        t0 = time.monotonic()
        while True:  # the aggregator only, every 50 ms: status queries cost the daemons CPU too
            status = cluster.status(agg)
            if status is not None and status.round >= end:
                break
            if time.monotonic() - t0 > 600:
                raise SystemExit("the window did not finish in 600 s")
            time.sleep(0.05)
        wall = time.monotonic() - t0
        cpu1 = [_cpu(f"/proc/{p}/stat") for p in pids]
        threads1 = [_threads(p) for p in pids]
        now = [cluster.status(i) for i in range(n)]
        last = [s for s in now if s is not None]
    rounds = last[agg].round - r0
    per = lambda a, b: (b - a) / rounds  # noqa: E731
    train = [per(a.training_seconds, b.training_seconds) for a, b in zip(first, last, strict=True)]
    proto = [per(a.protocol_seconds, b.protocol_seconds) for a, b in zip(first, last, strict=True)]
    sent = [per(a.bytes_out, b.bytes_out) for a, b in zip(first, last, strict=True)]
    clients = [i for i in range(n) if i != agg]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    cpu = sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / rounds
    print(f"{n} daemons, FedAvg, {rounds} rounds measured, aggregator node-{agg}")
    print(f"wall per round:               {1000 * wall / rounds:7.1f} ms")
    print(f"aggregator training:          {1000 * train[agg]:7.1f} ms/round")
    print(f"aggregator protocol (enc/sign/verify/dec): {1000 * proto[agg]:7.1f} ms/round")
    print(f"client training (mean):       {1000 * mean([train[i] for i in clients]):7.1f} ms/round")
    print(f"client protocol (mean):       {1000 * mean([proto[i] for i in clients]):7.1f} ms/round")
    print(f"bytes sent per round:         aggregator {sent[agg] / 1e3:.0f} kB, "
          f"client {mean([sent[i] for i in clients]) / 1e3:.0f} kB")  # fmt: skip
    critical = train[agg] + proto[agg] + mean([train[i] + proto[i] for i in clients])
    print(f"training + protocol on the critical path: {1000 * critical:7.1f} ms/round "
          f"(round / that = {wall / rounds / critical:.2f})")  # fmt: skip
    # Transfer on a bridge inside one machine is CPU: the SCTP/DTLS stack in each daemon's
    # asyncio (aiortc) thread; the aggregator's and one client's are on the critical path.
    bridge = "asyncio bridge (aiortc)"
    transfer = [_by_role(threads0[i], threads1[i]).get(bridge, 0.0) / rounds for i in range(n)]
    path = critical + transfer[agg] + mean([transfer[i] for i in clients])
    print(f"+ transfer (aiortc thread CPU, aggregator {1000 * transfer[agg]:.1f} + client "
          f"{1000 * mean([transfer[i] for i in clients]):.1f}): {1000 * path:7.1f} ms/round "
          f"(round / that = {wall / rounds / path:.2f}; target <= 2)")  # fmt: skip
    cores = os.cpu_count() or 1
    print(f"CPU of all daemons:           {1000 * cpu:7.1f} ms/round "
          f"({cpu / (wall / rounds):.2f} of {cores} cores busy)")  # fmt: skip
    for label, who in (("aggregator", [agg]), ("clients (mean)", clients)):
        roles: dict[str, float] = {}
        for i in who:
            for role, value in _by_role(threads0[i], threads1[i]).items():
                roles[role] = roles.get(role, 0.0) + value / len(who)
        busy = sorted(((v, k) for k, v in roles.items()), reverse=True)
        print(f"{label} CPU by thread, ms per round:",
              ", ".join(f"{k} {1000 * v / rounds:.1f}" for v, k in busy[:4]))  # fmt: skip


if __name__ == "__main__":
    main()
