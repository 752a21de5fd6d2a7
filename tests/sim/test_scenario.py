"""Scenario files: every mistake is an error that names the file and the key."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from p2pfl.sim.scenario import ScenarioError, load_scenario, parse_scenario

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["network"].update(los=0.1), "network.los: unknown key"),
        (lambda d: d["network"].update(loss=1.5), "network.loss: must be in [0.0, 1.0)"),
        (lambda d: d["task"].update(nodes="ten"), "task.nodes: must be int"),
        (lambda d: d["task"].pop("name"), "task.name: is required"),
        (lambda d: d["setup"][1].update(protocol="raft"), "setup[1].protocol: must be one"),
        (lambda d: d["setup"][2].update(name="gossip"), "setup[2].name: 'gossip' is used"),
        (lambda d: d.update(setup=[]), "setup: needs at least one"),
        (lambda d: d["stop"].update(rounds=0), "stop.rounds: must be at least 1"),
        (lambda d: d["stop"].update(time=0.0), "stop.time: must be a positive, finite"),
        (lambda d: d.update(name="../esc"), "name: '../esc' names the results folder"),
        (
            lambda d: d["setup"][2].update(aggregator="n009"),
            "setup[2].aggregator: 'n009' is not a node id; ids are n000..n005",
        ),
        (lambda d: d["stop"].update(time=float("inf")), "stop.time: must be a positive, finite"),
        (lambda d: d["task"].update(partition="skewed"), "task.partition: must be one of"),
        (lambda d: d["task"].update(name="digts"), "task.name: must be one of digits, "),
        (
            lambda d: d["task"].update(name="traffic-metr-la", partition="dirichlet"),
            "task.partition: the nodes of traffic-metr-la are its cloudlets",
        ),
        (
            lambda d: d["network"].update(partitions=[{"start": 5.0, "end": 2.0}]),
            "network.partitions[0].end: must be after start",
        ),
        (lambda d: d["training"].update(epochs=True), "training.epochs: must be float"),
    ],
)
def test_mistake_names_file_and_key(tiny_dict: dict[str, Any], change: Any, message: str) -> None:
    change(tiny_dict)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(tiny_dict, "exp.toml")
    assert str(info.value).startswith("exp.toml: ")
    assert message in str(info.value)


def test_bad_toml_and_missing_file_name_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match=r"nope\.toml: cannot read"):
        load_scenario(tmp_path / "nope.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfename = 1\n")
    with pytest.raises(ScenarioError, match=r"binary\.toml: not UTF-8 text \(byte 0\)"):
        load_scenario(binary)


def test_defaults_fill_what_is_left_out(tiny_dict: dict[str, Any]) -> None:
    scenario = parse_scenario(tiny_dict)
    assert scenario.network.loss == 0.0 and scenario.churn.fraction == 0.0
    assert scenario.setups[0].aggregation == "mean" and scenario.setups[0].stop is None


@pytest.mark.parametrize("path", sorted(SIMULATIONS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_are_valid(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.setups and scenario.task.nodes >= 1


def _traffic(tiny_dict: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    tiny_dict["task"] = {"name": "traffic-metr-la", "nodes": 7, "options": {"days": 2}}
    tiny_dict["setup"] = [{"name": "gossip", "protocol": "gossip"}]
    tiny_dict["live"] = live
    return tiny_dict


def test_live_replay_reaches_every_daemons_configuration(
    tiny_dict: dict[str, Any], tmp_path: Path
) -> None:
    from p2pfl.daemon.config import load_config
    from p2pfl.sim import processes

    scenario = parse_scenario(_traffic(tiny_dict, {"replay_speed": 12.0}), "live.toml")
    assert scenario.live.replay_speed == 12.0
    spec = processes._cluster_spec(scenario, scenario.setups[0])

    addresses = SimpleNamespace(addresses=[f"10.77.0.{i + 2}" for i in range(7)])
    with processes.DaemonCluster(tmp_path / "c", spec, addresses) as cluster:  # type: ignore[arg-type]
        for node in cluster.nodes:
            assert load_config(node.config_path).data.replay_speed == 12.0
    off = parse_scenario(_traffic(copy.deepcopy(tiny_dict), {}), "off.toml")
    spec = processes._cluster_spec(off, off.setups[0])
    with processes.DaemonCluster(tmp_path / "d", spec, addresses) as cluster:  # type: ignore[arg-type]
        assert load_config(cluster.nodes[0].config_path).data.replay_speed == 0.0


def test_live_replay_is_refused_where_it_cannot_run(tiny_dict: dict[str, Any]) -> None:
    from p2pfl.sim import virtual

    digits = copy.deepcopy(tiny_dict)
    digits["live"] = {"replay_speed": 12.0}
    with pytest.raises(ScenarioError, match=r"live.replay_speed: live replay needs a graph"):
        parse_scenario(digits, "x.toml")
    with pytest.raises(ScenarioError, match=r"live.rplay_speed: unknown key"):
        parse_scenario(_traffic(copy.deepcopy(tiny_dict), {"rplay_speed": 1.0}), "x.toml")
    scenario = parse_scenario(_traffic(tiny_dict, {"replay_speed": 12.0}), "x.toml")
    with pytest.raises(ScenarioError, match=r"live.replay_speed: .*--engine processes"):
        virtual.run(scenario)
