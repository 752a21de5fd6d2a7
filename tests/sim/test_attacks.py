"""[[attack]] in scenarios: parsed with file:line errors, applied by the virtual engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pfl.learning.attacks import Attack
from p2pfl.sim import virtual
from p2pfl.sim.attacks import attackers
from p2pfl.sim.scenario import Scenario, ScenarioError, load_scenario

Tiny = Callable[..., Scenario]

HEAD = """name = "a"
[task]
name = "digits-logreg"
nodes = 6
[stop]
time = 10.0
[[setup]]
name = "g"
protocol = "gossip"
aggregation = "mean"
[[setup]]
name = "f"
protocol = "fedavg"
aggregation = "mean"
"""


def load(tmp_path: Path, attack: str) -> Scenario:
    path = tmp_path / "s.toml"
    path.write_text(HEAD + attack)
    return load_scenario(path)


@pytest.mark.parametrize(
    ("attack", "line", "key", "problem"),
    [
        ('[[attack]]\nnodes = 0.2\nkind = "flood"\n', 17, "kind", "must be one of sign-flip"),
        ("[[attack]]\nnodes = 0.2\n", 15, "kind", "is required"),
        ('[[attack]]\nkind = "ipm"\n', 15, "nodes", "is required"),
        ('[[attack]]\nkind = "ipm"\nnodes = 1.5\n', 17, "nodes", "fraction must be in (0, 1)"),
        ('[[attack]]\nkind = "ipm"\nnodes = ["n009"]\n', 17, "nodes", "ids are n000..n005"),
        # One node is never drawn (FedAvg's aggregator), and some node must stay to be scored.
        ('[[attack]]\nkind = "ipm"\nnodes = 0.95\n', 17, "nodes", "is 6 attackers; at most 5"),
        (
            '[[attack]]\nkind = "absent"\nnodes = ["n000", "n001", "n002", "n003", "n004", '
            '"n005"]\n',
            17,
            "nodes",
            "lists every node",
        ),
        ('[[attack]]\nkind = "ipm"\nnodes = 0.2\nepsilon = "big"\n', 18, "epsilon", "a number"),
        ('[[attack]]\nkind = "ipm"\nnodes = 0.2\nstart = -1\n', 18, "start", ">= 0"),
        ('[[attack]]\nkind = "ipm"\nnodes = 0.2\nspeed = 1\n', 18, "speed", "unknown key"),
        (
            '[[attack]]\nkind = "label-flip"\nnodes = 0.2\nstart_round = 2\n',
            18,
            "start_round",
            "no start",
        ),
        (
            '[[attack]]\nkind = "ipm"\nnodes = 0.2\nsetups = ["h"]\n',
            18,
            "setups",
            "no setup named 'h'",
        ),
        (
            '[[attack]]\nkind = "ipm"\nnodes = 0.2\n[[attack]]\nkind = "nan"\nnodes = 0.2\n'
            'setups = ["f"]\n',
            21,
            "setups",
            "already has attack[0]",
        ),
    ],
)
def test_bad_attack_tables_name_file_line_and_key(
    tmp_path: Path, attack: str, line: int, key: str, problem: str
) -> None:
    with pytest.raises(ScenarioError) as info:
        load(tmp_path, attack)
    message = str(info.value)
    index = 1 if "already has" in problem else 0
    assert message.startswith(f"{tmp_path / 's.toml'}:{line}: attack[{index}].{key}: "), message
    assert problem in message


def test_a_fraction_is_drawn_by_seed_among_nodes_but_fedavgs_aggregator(tmp_path: Path) -> None:
    scenario = load(tmp_path, '[[attack]]\nkind = "ipm"\nnodes = 0.34\nepsilon = 3\n')
    for setup in scenario.setups:
        chosen = attackers(scenario, setup)
        assert len(chosen) == 2 and 0 not in chosen
        assert set(chosen.values()) == {Attack("ipm", epsilon=3.0)}
    explicit = load(tmp_path, '[[attack]]\nkind = "nan"\nnodes = ["n000", "n004"]\nsetups = ["g"]')
    assert attackers(explicit, explicit.setups[0]) == {0: Attack("nan"), 4: Attack("nan")}
    assert attackers(explicit, explicit.setups[1]) == {}


def test_the_evaluation_sample_is_drawn_from_the_honest_nodes(tiny: Tiny) -> None:
    # One node scored of six, five of them attackers: it is the honest one (a sample drawn from
    # all six, attackers then left out, could be empty: no curve at all).
    scenario = tiny(
        training={"eval_nodes": 1, "path": "vectorized"},
        stop={"time": 3.0},
        setup=[{"name": "gossip", "protocol": "gossip", "period": 1.0}],
        attack=[{"nodes": ["n000", "n001", "n002", "n004", "n005"], "kind": "absent"}],
    )
    (result,) = virtual.run(scenario).setups
    assert [n.node for n in result.nodes] == ["n003"] and result.final["accuracy"] >= 0


@pytest.mark.slow
def test_the_virtual_engine_wraps_attackers_and_evaluates_only_honest_nodes(tiny: Tiny) -> None:
    setups = [
        {"name": "mean", "protocol": "gossip", "period": 1.0, "aggregation": "mean"},
        {"name": "clip", "protocol": "gossip", "period": 1.0, "aggregation": "clip"},
    ]
    clean = {s.name: s for s in virtual.run(tiny(setup=setups)).setups}
    attack = [{"nodes": ["n002"], "kind": "scale", "factor": -50.0}]
    attacked = {s.name: s for s in virtual.run(tiny(setup=setups, attack=attack)).setups}
    for name in ("mean", "clip"):
        assert [n.node for n in attacked[name].nodes] == ["n000", "n001", "n003", "n004", "n005"]
        assert attacked[name].extra["attackers"] == ["n002"]
        assert attacked[name].extra["attack"] == {"kind": "scale", "factor": -50.0}
    assert clean["mean"].final["accuracy"] > 0.8
    # Plain averaging follows the attacker; clipping around the own model does not.
    assert attacked["mean"].final["accuracy"] < clean["mean"].final["accuracy"] - 0.2, (
        clean,
        attacked,
    )
    assert attacked["clip"].final["accuracy"] > clean["clip"].final["accuracy"] - 0.05


class _Addresses:
    def __init__(self, n: int) -> None:
        self.addresses = [f"10.77.0.{i + 2}" for i in range(n)]


def test_the_processes_engine_runs_attackers_as_the_attacking_build_of_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from p2pfl.daemon import node as daemon_node
    from p2pfl.daemon import trainer as daemon_trainer
    from p2pfl.daemon.config import load_config
    from p2pfl.learning.attacks import AttackingLearner
    from p2pfl.sim import attacker, processes

    scenario = load(tmp_path, '[[attack]]\nkind = "label-flip"\nnodes = ["n002", "n004"]\n')
    spec = processes._cluster_spec(scenario, scenario.setups[0])
    assert dict(spec.attackers) == {2: Attack("label-flip"), 4: Attack("label-flip")}
    with processes.DaemonCluster(tmp_path / "c", spec, _Addresses(6)) as cluster:
        attack_json, colluders_json = cluster._attack_args(2)
        assert json.loads(colluders_json) == [cluster.nodes[4].identity.node_id]
        # What the attacking build does to this process's daemon (undone after the test).
        monkeypatch.setattr(daemon_node, "build_machine", daemon_node.build_machine)
        monkeypatch.setattr(
            daemon_trainer.NodeTrainer, "__init__", daemon_trainer.NodeTrainer.__init__
        )
        attacker.install(attack_json, colluders_json)
        config = load_config(cluster.nodes[2].config_path)
        machine = daemon_node.build_machine(config, cluster.nodes[2].identity.node_id, 1.0)
        assert isinstance(machine, AttackingLearner) and machine.attack == Attack("label-flip")
        from p2pfl.ml.task import DigitsTask

        task = DigitsTask(n_nodes=6, seed=0)
        trainer = daemon_trainer.NodeTrainer(task, 2)
        try:
            honest = task.node_data(2, 6).train_set.tensors[1]
            assert (trainer.data.train_set.tensors[1] == 9 - honest).all()
        finally:
            trainer.close()


@pytest.mark.slow
@pytest.mark.netns
def test_the_processes_engine_evaluates_only_honest_daemons_under_a_real_attacker(
    tmp_path: Path,
) -> None:
    from p2pfl.sim import processes
    from p2pfl.sim.netns import can_create_namespaces

    if not can_create_namespaces():
        pytest.skip("cannot create network namespaces")
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "p"\n[task]\nname = "digits"\nnodes = 4\n[training]\nepochs = 0.5\n'
        "eval_interval = 1.0\n[network]\nlatency_ms = 0.0\nbandwidth_mbps = 1000.0\n"
        '[stop]\ntime = 60.0\nrounds = 5\n[[setup]]\nname = "fedavg"\nprotocol = "fedavg"\n'
        'aggregation = "mean"\nround_timeout = 3.0\n'
        '[[attack]]\nnodes = ["n003"]\nkind = "scale"\nfactor = -100.0\n'
    )
    (setup,) = processes.run(load_scenario(path)).setups
    assert len(setup.nodes) == 3 and setup.extra["attackers"] == ["node-3"]
    assert setup.extra["attack"] == {"kind": "scale", "factor": -100.0}
    # Plain averaging with the attacking daemon among them: the honest daemons collapse (from
    # the first averaged round on; the run stops at round 5).
    assert setup.final["accuracy"] < 0.5


@pytest.mark.slow
@pytest.mark.netns
def test_the_processes_engine_runs_the_honest_only_federation_without_absent_daemons(
    tmp_path: Path,
) -> None:
    from p2pfl.sim import processes
    from p2pfl.sim.netns import can_create_namespaces

    if not can_create_namespaces():
        pytest.skip("cannot create network namespaces")
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "p"\n[task]\nname = "digits"\nnodes = 4\n[training]\nepochs = 0.5\n'
        "eval_interval = 5.0\n[network]\nlatency_ms = 0.0\nbandwidth_mbps = 1000.0\n"
        '[stop]\ntime = 60.0\nrounds = 6\n[[setup]]\nname = "sf"\nprotocol = "server-free"\n'
        'aggregation = "mean"\nround_timeout = 30.0\n'
        '[[attack]]\nnodes = ["n001"]\nkind = "absent"\n'
    )
    (setup,) = processes.run(load_scenario(path)).setups
    assert setup.extra["attackers"] == ["node-1"] and setup.extra["attack"] == {"kind": "absent"}
    assert sorted(n.extra["name"] for n in setup.nodes) == ["node-0", "node-2", "node-3"]
    # Real daemons: the three present ones learn together, linked to each other only. Rounds
    # close on the present peers (a round waiting for the absent one would take the 30 s timeout
    # each: 6 rounds would not fit the 60 s run).
    for node in setup.nodes:
        assert node.rounds >= 6, (node.rounds, node.extra)
        assert node.extra["peers_connected"] == 2, node.extra
        assert len(node.extra["bytes_out_by_peer"]) == 2, node.extra
    assert setup.final["accuracy"] > 0.5


def test_absent_nodes_are_never_started_in_the_virtual_engine(tiny: Tiny) -> None:
    setups = [
        {"name": "g", "protocol": "gossip", "period": 1.0},
        {"name": "s", "protocol": "server-free", "round_timeout": 2.0},
    ]
    attack = [{"nodes": ["n002", "n004"], "kind": "absent"}]
    runs = {s.name: s for s in virtual.run(tiny(setup=setups, attack=attack)).setups}
    for name in ("g", "s"):
        run = runs[name]
        assert [n.node for n in run.nodes] == ["n000", "n001", "n003", "n005"]
        assert run.extra["attackers"] == ["n002", "n004"]
        assert run.extra["attack"] == {"kind": "absent"}
        # The others never knew them: nothing sent to them, nothing lost to them.
        for node in run.nodes:
            assert not node.extra["messages_lost"], node.extra
        assert run.final["accuracy"] > 0.5
    # Server-free rounds close on the present peers (no timeout waits for the absent ones).
    assert all(
        set(n.extra["models_received_from"]) == {"n000", "n001", "n003", "n005"} - {n.node}
        for n in runs["s"].nodes
    )


def test_an_absent_node_takes_no_start_and_runs_no_machine() -> None:
    from p2pfl.learning.attacks import AttackingLearner

    with pytest.raises(ValueError, match="no start"):
        Attack("absent", start=1.0)
    assert not Attack("absent").tampers
    with pytest.raises(ValueError, match="absent node runs no machine"):
        AttackingLearner(None, Attack("absent"))  # type: ignore[arg-type]


def test_the_processes_engine_never_starts_an_absent_daemon(tmp_path: Path) -> None:
    from p2pfl.sim import processes

    scenario = load(tmp_path, '[[attack]]\nkind = "absent"\nnodes = ["n002"]\n')
    spec = processes._cluster_spec(scenario, scenario.setups[0])
    assert spec.absent == {2}
    # Each daemon starts learning once the 4 others that run are up, not after waiting for 5.
    assert spec.start_peers == 4
    spec = dataclasses.replace(spec, static_peers=True)
    with processes.DaemonCluster(tmp_path / "c", spec, _Addresses(6)) as cluster:
        started: list[int] = []
        cluster.start = started.append  # type: ignore[method-assign,assignment]
        cluster.start_all()
        assert started == [0, 1, 3, 4, 5]
        # Nobody is told to dial it.
        for node in cluster.nodes:
            assert "10.77.0.4:" not in node.config_path.read_text()
