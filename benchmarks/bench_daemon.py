"""Daemon benchmarks (issue 6): protocol overhead per round, idle cost, daemons per machine.

Real `p2pfl run` daemons in a private network namespace (net's BridgedNetwork), observed only
through their control sockets and /proc:

1. 4 daemons gossiping on digits: time spent encoding+signing+verifying+decoding messages per
   round, against the training time per round (target: overhead <= 10 %).
2. The same daemons idle (gossip period of an hour): CPU and RSS per daemon, against a baseline
   measured in the same run: a bare Python process that imported what the daemon imports.
3. Scale: N idle daemons fully meshed; does every daemon keep all N-1 peers connected (no peer
   lost to missed heartbeats) for the observation window? (goal: 32 on this 2-core machine).

Needs root (or run it under `python -m p2pfl.sim.netns -- ...`). Usage:
    python benchmarks/bench_daemon.py [--scale 4,8,16] [--observe 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces
from p2pfl.sim.processes import ClusterSpec, DaemonCluster

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_ready(cluster: DaemonCluster, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all(cluster.status(i, timeout=2) is not None for i in range(len(cluster.nodes))):
            return time.monotonic() - started
        time.sleep(1)
    raise SystemExit("daemons did not start in time")


def _wait_meshed(cluster: DaemonCluster, timeout: float) -> float:
    n = len(cluster.nodes)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        statuses = [cluster.status(i, timeout=5) for i in range(n)]
        if all(s and sum(p.state == "connected" for p in s.peers) == n - 1 for s in statuses):
            return time.monotonic() - started
        time.sleep(1)
    return float("nan")


def bench_overhead(seconds: float, epochs: float) -> None:
    print(f"== 1. protocol overhead per round: 4 daemons, digits, gossip (period 1 s, "
          f"{epochs} epoch per round)")  # fmt: skip
    spec = ClusterSpec(n_nodes=4, epochs=epochs, params={"period": 1.0}, checkpoint_interval_s=60)
    with (
        tempfile.TemporaryDirectory(prefix="p2pfl-b-", dir="/tmp") as root,
        BridgedNetwork(4) as net,
        DaemonCluster(Path(root), spec, net) as cluster,
    ):
        cluster.start_all()
        _wait_ready(cluster, 300)
        _wait_meshed(cluster, 120)
        before = [cluster.status(i) for i in range(4)]
        time.sleep(seconds)
        after = [cluster.status(i) for i in range(4)]
        print(
            f"{'node':<8}{'rounds':>8}{'train s/round':>16}{'protocol s/round':>18}{'overhead':>10}"
        )
        ratios = []
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            assert a is not None and b is not None
            rounds = max(1, a.round - b.round)
            train = (a.training_seconds - b.training_seconds) / rounds
            proto = (a.protocol_seconds - b.protocol_seconds) / rounds
            ratios.append(proto / train if train else float("nan"))
            print(f"node-{i:<3}{rounds:>8}{train:>16.4f}{proto:>18.4f}{ratios[-1]:>10.1%}")
        mean = sum(ratios) / len(ratios)
        print(f"mean overhead {mean:.1%} of training time  (target <= 10 %: "
              f"{'met' if mean <= 0.10 else 'NOT met'})")  # fmt: skip
        model_bytes = after[0].bytes_out / max(1, after[0].round) if after[0] else 0
        print(f"bytes sent per round per node: {model_bytes / 1024:.0f} KiB (fp32 MLP)")
        cluster.stop_all()


def _baseline_process() -> subprocess.Popen[bytes]:
    code = (
        "import torch, aiortc, zeroconf, trio, time, sys;"
        "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(3600)"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


def bench_idle(seconds: float) -> None:
    print("== 2. idle daemons (4, gossip period 3600 s): CPU and RSS each")
    baseline = _baseline_process()
    assert baseline.stdout is not None
    baseline.stdout.readline()
    spec = ClusterSpec(n_nodes=4, params={"period": 3600.0}, checkpoint_interval_s=3600)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="p2pfl-b-", dir="/tmp") as root,
            BridgedNetwork(4) as net,
            DaemonCluster(Path(root), spec, net) as cluster,
        ):
            cluster.start_all()
            _wait_ready(cluster, 300)
            _wait_meshed(cluster, 120)
            time.sleep(5)
            pids = [n.process.pid for n in cluster.nodes if n.process is not None]
            cpu0 = [_cpu_seconds(p) for p in [*pids, baseline.pid]]
            time.sleep(seconds)
            cpu1 = [_cpu_seconds(p) for p in [*pids, baseline.pid]]
            use = [(b - a) / seconds for a, b in zip(cpu0, cpu1, strict=True)]
            rss = [_rss_mib(p) for p in [*pids, baseline.pid]]
            for i in range(len(pids)):
                print(f"daemon {i}: CPU {use[i]:6.1%} of a core, RSS {rss[i]:6.0f} MiB")
            print(f"baseline (python + torch/aiortc/zeroconf imported, sleeping): CPU "
                  f"{use[-1]:6.1%}, RSS {rss[-1]:6.0f} MiB")  # fmt: skip
            cluster.stop_all()
    finally:
        baseline.kill()
        baseline.wait()


def bench_scale(sizes: list[int], seconds: float) -> None:
    print("== 3. idle daemons fully meshed: do all keep all peers (no missed heartbeats)?")
    for n in sizes:
        spec = ClusterSpec(
            n_nodes=n, params={"period": 3600.0}, checkpoint_interval_s=3600, mdns=True
        )
        with (
            tempfile.TemporaryDirectory(prefix="p2pfl-b-", dir="/tmp") as root,
            BridgedNetwork(n) as net,
            DaemonCluster(Path(root), spec, net) as cluster,
        ):
            t0 = time.monotonic()
            cluster.start_all()
            ready = _wait_ready(cluster, 60 + 20 * n)
            meshed = _wait_meshed(cluster, 60 + 10 * n)
            lost = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for i in range(n):
                    status = cluster.status(i, timeout=10)
                    if status is not None:
                        lost += sum(p.state != "connected" for p in status.peers)
                time.sleep(2)
            rss = sum(_rss_mib(x.process.pid) for x in cluster.nodes if x.process) / n
            print(f"{n:3d} daemons: ready in {ready:5.0f} s, meshed in {meshed:5.0f} s, "
                  f"peer-down observations in {seconds:.0f} s: {lost}, RSS {rss:.0f} MiB each, "
                  f"total {time.monotonic() - t0:.0f} s")  # fmt: skip
            cluster.stop_all(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="8", help="comma-separated daemon counts for part 3")
    parser.add_argument("--observe", type=float, default=30.0, help="seconds per observation")
    parser.add_argument("--epochs", type=float, default=1.0, help="local epochs per round")
    parser.add_argument("--only", choices=("overhead", "idle", "scale"), default=None)
    args = parser.parse_args()
    if not can_create_namespaces():
        raise SystemExit("needs network namespaces: run as root or under python -m p2pfl.sim.netns")
    if args.only in (None, "overhead"):
        bench_overhead(args.observe, args.epochs)
    if args.only in (None, "idle"):
        bench_idle(args.observe)
    if args.only in (None, "scale"):
        bench_scale([int(x) for x in args.scale.split(",")], args.observe)


if __name__ == "__main__":
    main()
