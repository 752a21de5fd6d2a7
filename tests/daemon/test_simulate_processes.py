"""`p2pfl simulate --engine processes`: real daemons, the virtual engine's results format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.sim.netns import can_create_namespaces
from p2pfl.sim.results import load_results

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]


def _simulate(scenario: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`p2pfl simulate SCENARIO --engine processes` as a user runs it; it must exit 0."""
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "simulate", str(scenario), "--engine", "processes",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result


SCENARIO = """
name = "tiny"
seed = 1
[task]
name = "digits"
nodes = 3
[training]
epochs = 0.5
eval_interval = 1.0
[stop]
time = 10.0
rounds = 20
[[setup]]
name = "server-free"
protocol = "server-free"
round_timeout = 2.0
"""


def test_processes_engine_runs_server_free_fl_with_real_daemons_and_writes_results(
    short_tmp: Path,
) -> None:
    scenario = short_tmp / "tiny.toml"
    scenario.write_text(SCENARIO)
    out = short_tmp / "out"
    result = _simulate(scenario, out)
    # The harness names every daemon's control socket while it runs.
    assert result.stdout.count("p2pfl status --socket /tmp/p2pfl-sim-") == 3
    results = load_results(out / "results.json")
    assert results.engine == "processes" and results.task == "digits"
    (setup,) = results.setups
    assert setup.protocol == "server-free" and len(setup.nodes) == 3
    assert setup.final["accuracy"] > 0.7
    assert setup.bytes_sent > 0 and setup.virtual_time_s is None
    for node in setup.nodes:
        assert node.extra["exit_code"] == 0  # stopped cleanly with SIGTERM
        assert node.extra["peers_connected"] == 2
        assert len(node.extra["bytes_out_by_peer"]) == 2  # all: it sent models to both peers
        assert all(b > 0 for b in node.extra["bytes_out_by_peer"].values())
        assert node.rounds >= 3 and node.history
        assert node.final["accuracy"] > 0.7  # each one learned (untrained: about 0.1)
    for name in ("results.csv", "summary.csv", "metric_vs_time.png", "bytes_per_node.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["format"] == "p2pfl-sim-results/1"


CHURN = """
name = "churn"
seed = 3
[task]
name = "digits"
nodes = 3
[training]
epochs = 0.5
eval_interval = 1.0
[network]
partitions = [{start = 18.0, end = 28.0, groups = 2}]
[churn]
fraction = 0.67
start = 6.0
end = 8.0
downtime = 5.0
[stop]
time = 36.0
[[setup]]
name = "gossip"
protocol = "gossip"
period = 1.0
"""


def test_processes_engine_applies_churn_with_real_restarts_and_partitions_with_cut_links(
    short_tmp: Path,
) -> None:
    scenario = short_tmp / "churn.toml"
    scenario.write_text(CHURN)
    out = short_tmp / "out"
    _simulate(scenario, out)
    (setup,) = load_results(out / "results.json").setups
    not_applied = setup.extra["not_applied"]
    assert not any("churn" in x or "partition" in x for x in not_applied)
    applied = setup.extra["applied"]
    leaves = [a for a in applied if a["change"] == "leave"]
    joins = [a for a in applied if a["change"] == "join"]
    # Two of three nodes leave: one stopped with SIGTERM, one killed, both started again.
    assert sorted(a["signal"] for a in leaves) == ["SIGKILL", "SIGTERM"]
    assert sorted(a["node"] for a in joins) == sorted(a["node"] for a in leaves)
    assert all(a["started"] for a in joins)
    # Groups {0, 1} | {2}: two links cut; before the heal, node 2 had no peer left.
    cut, heal = (a for a in applied if a["change"] in ("cut", "heal"))
    assert cut["links"] == heal["links"] == 2
    assert heal["connected_before"] == [1, 1, 0]
    for node in setup.nodes:
        assert node.extra["running_at_end"] and node.extra["exit_code"] == 0
        assert node.extra["peers_connected"] == 2  # healed and rejoined
        assert node.final["accuracy"] > 0.7
    for leave in leaves:
        history = setup.nodes[leave["node"]].history
        before = [h["round"] for h in history if h["time"] < leave["time"]]
        after = [h["round"] for h in history if h["time"] > leave["time"] + 5.0]
        assert before and after and before[-1] >= 2
        if leave["signal"] == "SIGTERM":
            # It checkpointed on the way out and counts on from there, not from 0 (resuming
            # after SIGKILL from an older checkpoint is pinned in test_cluster.py).
            assert after[0] >= before[-1]


def test_processes_engine_runs_fedavg_around_the_configured_aggregator(short_tmp: Path) -> None:
    scenario = short_tmp / "fedavg.toml"
    scenario.write_text(
        SCENARIO.replace('name = "server-free"\nprotocol = "server-free"', 'name = "fedavg"\n'
                         'protocol = "fedavg"\naggregator = "n002"')
    )  # fmt: skip
    out = short_tmp / "out"
    _simulate(scenario, out)
    (setup,) = load_results(out / "results.json").setups
    assert setup.protocol == "fedavg"
    for node in setup.nodes:
        assert node.extra["exit_code"] == 0 and node.extra["peers_connected"] == 2
        assert node.rounds >= 3 and node.final["accuracy"] > 0.7
    # node-2 aggregates: it sends the global model to both others, each of them sends one
    # update back to it only, so it sends about twice what either participant does.
    aggregator, *participants = setup.nodes[2], setup.nodes[0], setup.nodes[1]
    assert all(aggregator.bytes_sent > 1.5 * p.bytes_sent for p in participants)
