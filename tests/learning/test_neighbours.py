"""neighbours = "range": the cloudlets within range, the same sets in both engines and the daemon.

The traffic study's server-free FL lets a cloudlet talk only to the cloudlets within
communication range. These tests run the committed METR-LA scenario's server-free setup (cut to
two short rounds) in the virtual engine and check whom every node really exchanged models with,
then check that the daemon configurations the processes engine writes for the same setup give
every daemon exactly those neighbours.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, ClassVar

import pytest

from p2pfl.daemon.config import load_config
from p2pfl.daemon.node import build_machine, neighbour_set
from p2pfl.learning.neighbours import resolve, task_positions, task_range_km, within_range
from p2pfl.learning.ops import load_scenario_task
from p2pfl.ml import load_graph, partition_cloudlets
from p2pfl.sim import processes, virtual
from p2pfl.sim.scenario import Scenario, ScenarioError, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
METR_LA = ROOT / "simulations" / "traffic-metr-la.toml"


def _metr_la_server_free(**setup: Any) -> Scenario:
    raw = tomllib.loads(METR_LA.read_text())
    tiny = copy.deepcopy(raw)
    tiny["task"]["options"] = {"days": 2}
    tiny["training"]["eval_interval"] = 1e6  # score only at the start and the end
    tiny["stop"] = {"time": 2000.0, "rounds": 2}
    (server_free,) = [s for s in raw["setup"] if s["protocol"] == "server-free"]
    tiny["setup"] = [{**server_free, **setup}]
    return parse_scenario(tiny, str(METR_LA))


@pytest.fixture(scope="module")
def metr_la() -> Scenario:
    return _metr_la_server_free()


@pytest.fixture(scope="module")
def in_range(metr_la: Scenario) -> list[set[str]]:
    """Independently of learning.neighbours: the partition's own cloudlet neighbour graph."""
    partition = partition_cloudlets(load_graph("metr-la"))
    ids = virtual.node_ids(7)
    return [{ids[j] for j in partition.neighbours[i]} for i in range(7)]


@pytest.mark.parametrize("graph", ["metr-la", "pems-bay"])
def test_range_reproduces_the_cloudlet_partitions_neighbour_graph(graph: str) -> None:
    sensors = load_graph(graph)
    partition = partition_cloudlets(sensors)
    positions = {str(c.id): (c.lat, c.lon) for c in sensors.cloudlets}
    for c in sensors.cloudlets:
        expected = {str(j) for j in partition.neighbours[c.id]}
        assert within_range(str(c.id), positions, partition.range_km) == expected
    # Not everyone: the range really restricts (else this test could not tell).
    assert any(len(n) < len(sensors.cloudlets) - 1 for n in partition.neighbours)


def test_committed_traffic_scenarios_use_range(metr_la: Scenario) -> None:
    assert metr_la.setups[0].neighbours == "range"
    pems = tomllib.loads((ROOT / "simulations" / "traffic-pems-bay.toml").read_text())
    assert [s.get("neighbours") for s in pems["setup"] if s["protocol"] == "server-free"] == [
        "range"
    ]


def test_metr_la_server_free_exchanges_exactly_with_the_cloudlets_in_range(
    metr_la: Scenario, in_range: list[set[str]]
) -> None:
    (result,) = virtual.run(metr_la).setups
    assert len(result.nodes) == 7
    for i, node in enumerate(result.nodes):
        assert node.rounds == 2
        assert set(node.extra["models_sent_to"]) == in_range[i], node.node
        assert set(node.extra["models_received_from"]) == in_range[i], node.node
        assert "not_neighbour" not in node.extra["dropped"]
    assert any(len(peers) < 6 for peers in in_range)


def test_processes_engine_configs_give_every_daemon_the_same_neighbours(
    metr_la: Scenario, in_range: list[set[str]], tmp_path: Path
) -> None:
    class Addresses:
        addresses: ClassVar[list[str]] = [f"10.77.0.{i + 2}" for i in range(7)]

    task = load_scenario_task(metr_la)
    spec = processes._cluster_spec(metr_la, metr_la.setups[0], task)
    assert (spec.neighbours, spec.range_km) == ("range", 16.0)
    with processes.DaemonCluster(tmp_path, spec, Addresses()) as cluster:
        ids = [node.identity.node_id for node in cluster.nodes]
        by_virtual_name = dict(zip(virtual.node_ids(7), ids, strict=True))
        for i, node in enumerate(cluster.nodes):
            config = load_config(node.config_path)
            assert config.protocol.neighbours == "range"
            expected = {by_virtual_name[name] for name in in_range[i]}
            assert neighbour_set(config, ids[i]) == expected
            machine = build_machine(config, ids[i], task.make_model().state_dict())
            assert machine.neighbours == expected


def test_task_positions_and_range_come_from_the_graph_task(metr_la: Scenario) -> None:
    task = load_scenario_task(metr_la)
    graph = load_graph("metr-la")
    assert task_positions(task) == tuple((c.lat, c.lon) for c in graph.cloudlets)
    assert task_range_km(task) == 2 * graph.radius_km


def test_range_key_overrides_the_tasks_range(metr_la: Scenario) -> None:
    scenario = _metr_la_server_free(range_km=1.0)
    run = virtual._SetupRun(scenario, scenario.setups[0], _NoWorkload(metr_la), None)
    assert run.peer_sets == [frozenset()] * 7


class _NoWorkload:
    """Just enough of a workload for the engine's set-up (positions come from ``task``)."""

    def __init__(self, scenario: Scenario) -> None:
        self.task = load_scenario_task(scenario)


def test_range_without_positions_is_refused_with_the_key(tmp_path: Path) -> None:
    raw = {
        "name": "digits-range",
        "task": {"name": "digits-logreg", "nodes": 3},
        "stop": {"time": 10.0},
        "setup": [{"name": "sf", "protocol": "server-free", "neighbours": "range"}],
    }
    scenario = parse_scenario(raw, "digits-range.toml")
    with pytest.raises(
        ScenarioError, match=r"digits-range.toml: setup\[0\].neighbours: \"range\" needs"
    ):
        virtual.run(scenario)


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        ({"neighbours": "task"}, r"setup\[0\].neighbours: \"task\" is now called \"range\""),
        ({"range_km": 5.0}, r"setup\[0\].range_km: applies only with neighbours = \"range\""),
        (
            {"protocol": "gossip", "neighbours": "range"},
            r"setup\[0\].neighbours: only server-free",
        ),
    ],
)
def test_scenario_refuses_neighbours_it_cannot_apply(setup: dict[str, Any], says: str) -> None:
    raw = {
        "name": "x",
        "task": {"name": "digits-logreg", "nodes": 3},
        "stop": {"time": 10.0},
        "setup": [{"name": "sf", "protocol": "server-free", **setup}],
    }
    with pytest.raises(ScenarioError, match=says):
        parse_scenario(raw, "x.toml")


def test_resolve_names_what_is_missing() -> None:
    assert resolve("all", "a") is None
    assert resolve("topology", "a", links=["b", "a"]) == {"b"}
    with pytest.raises(ValueError, match="position of this node"):
        resolve("range", "a", positions={"b": (0.0, 0.0)}, range_km=1.0)
    with pytest.raises(ValueError, match="range_km"):
        resolve("range", "a", positions={"a": (0.0, 0.0)})
