"""Every committed scenario's setups reach the daemons as the same setup description.

The virtual engine hands the factory ``SetupSpec.learning``; the processes engine writes it into
each daemon's configuration, from which the daemon reads ``node.learner_setup(config)``. For
every setup of every scenario file in ``simulations/``, the two must be equal (FedAvg's
aggregator is a virtual node name on one side and that daemon's node id on the other), and so
must the neighbour sets ("topology" in the robustness scenarios, "range" in the traffic ones).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from p2pfl.daemon import node as daemon_node
from p2pfl.daemon.config import load_config
from p2pfl.learning.setup import setup_values
from p2pfl.ml import load_graph, partition_cloudlets
from p2pfl.sim import processes, virtual
from p2pfl.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "simulations").glob("*.toml"))


class _Addresses:
    def __init__(self, n: int) -> None:
        self.addresses = [f"10.77.{i // 250}.{i % 250 + 2}" for i in range(n)]


def _graph_task(name: str) -> Any:
    """What the neighbours need of a graph task (positions, range), without its speed data."""
    graph = load_graph(name.removeprefix("traffic-"))
    return SimpleNamespace(graph=graph, partition=partition_cloudlets(graph))


def test_every_scenario_file_is_covered() -> None:
    assert len(SCENARIOS) >= 8


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_each_daemon_reads_back_the_setup_the_virtual_engine_uses(
    path: Path, tmp_path: Path
) -> None:
    scenario = load_scenario(path)
    task = _graph_task(scenario.task.name) if scenario.task.name.startswith("traffic-") else None
    n = scenario.task.nodes
    checked = 0
    for setup in scenario.setups:
        if setup.protocol == "centralized":
            continue
        assert setup.learning is not None
        expected = setup_values(setup.learning)
        spec = processes._cluster_spec(scenario, setup, task)
        # The virtual engine's neighbour sets (its set-up reads only the workload's task).
        peer_sets = virtual._SetupRun(scenario, setup, SimpleNamespace(task=task), None).peer_sets  # type: ignore[arg-type]
        with processes.DaemonCluster(tmp_path / setup.name, spec, _Addresses(n)) as cluster:
            ids = [node.identity.node_id for node in cluster.nodes]
            as_daemon_ids = dict(zip(virtual.node_ids(n), ids, strict=True))
            for index in sorted({0, n - 1}):
                config = load_config(cluster.nodes[index].config_path)
                got = setup_values(daemon_node.learner_setup(config))
                if "aggregator" in got:
                    got["aggregator"] = virtual.node_ids(n)[ids.index(got["aggregator"])]
                if "range_km" not in expected:  # the task's range, written out for the daemon
                    got.pop("range_km", None)
                virtual_set = peer_sets[index]
                assert daemon_node.neighbour_set(config, ids[index]) == (
                    None if virtual_set is None else {as_daemon_ids[p] for p in virtual_set}
                ), setup.name
                assert got == expected, setup.name
                checked += 1
    assert checked > 0
