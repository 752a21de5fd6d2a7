"""Virtual engine: wall time, peak memory and node-rounds per second at 100 and 1,000 nodes.

Each run happens in its own child process, so peak RSS (ru_maxrss) belongs to that run alone;
the child also reports its RSS after imports and task loading, before the first event, so the
engine's own growth is visible. Baseline, measured in the same invocation: the 100-node run with
the learning core's torch training loop (path = "task") instead of the numpy path.
Target (issue 4): 1,000 gossip nodes x 50 rounds in under 5 minutes on this 2-core machine.

Usage: .venv/bin/python benchmarks/bench_sim.py [--quick]   (--quick: skip the 1,000-node run)
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 300.0


def _child(scenario_path: str, path: str) -> None:
    import resource
    import time

    from p2pfl.sim import virtual
    from p2pfl.sim.scenario import load_scenario
    from p2pfl.sim.workload import make_workload

    scenario = load_scenario(Path(scenario_path))
    scenario = replace(scenario, training=replace(scenario.training, path=path))
    workload = make_workload(scenario)
    workload.evaluate(workload.initial())  # warm up: first torch calls cost seconds here
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    results = virtual.run(scenario, workload=workload)
    wall = time.perf_counter() - started
    setup = results.setups[0]
    node_rounds = sum(n.rounds for n in setup.nodes)
    if setup.extra.get("evaluated_nodes", len(setup.nodes)) < setup.extra.get("nodes_total", 0):
        # Only a sample of nodes is in the results: scale their mean up to every node.
        node_rounds = round(node_rounds / len(setup.nodes) * setup.extra["nodes_total"])
    print(
        json.dumps(
            {
                "nodes": scenario.task.nodes,
                "path": path,
                "wall_s": wall,
                "node_rounds": node_rounds,
                "node_rounds_per_s": node_rounds / wall,
                "rss_ready_mb": rss_ready,
                "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "accuracy": setup.final.get("accuracy"),
                "virtual_s": setup.virtual_time_s,
            }
        )
    )


def _measure(scenario: str, path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(ROOT / "simulations" / scenario), path],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    runs = [("scale-100-gossip.toml", "task"), ("scale-100-gossip.toml", "vectorized")]
    if "--quick" not in sys.argv:
        runs.append(("scale-1000-gossip.toml", "vectorized"))
    print(
        f"{'run':<34}{'wall s':>9}{'node-rounds/s':>15}{'RSS ready MB':>14}"
        f"{'RSS peak MB':>13}{'accuracy':>10}"
    )
    for scenario, path in runs:
        m = _measure(scenario, path)
        label = f"{m['nodes']} nodes, {path}" + (" (baseline)" if path == "task" else "")
        print(
            f"{label:<34}{m['wall_s']:>9.1f}{m['node_rounds_per_s']:>15.0f}"
            f"{m['rss_ready_mb']:>14.0f}{m['rss_peak_mb']:>13.0f}{m['accuracy']:>10.3f}"
        )
        if m["nodes"] == 1000:
            verdict = "met" if m["wall_s"] < TARGET_S else "NOT met"
            print(f"target: 1,000 nodes x 50 rounds < {TARGET_S:.0f} s wall -> {verdict}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
