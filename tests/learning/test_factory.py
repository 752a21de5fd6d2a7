"""The factory: one setup description -> a learner, with the problems named by key."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from p2pfl.daemon.config import ConfigError, load_config
from p2pfl.daemon.node import build_machine
from p2pfl.learning.factory import LearnerSetup, SetupError, check_setup, make_learner, parameters
from p2pfl.learning.ops import StateDictOps
from p2pfl.protocols import FedAvgLearner, GossipLearner, ServerFreeLearner, Start, Train

WEIGHTS: dict[str, object] = {}


def _make(setup: LearnerSetup, **kwargs: object) -> object:
    return make_learner(setup, "a", WEIGHTS, StateDictOps(), random.Random(0), **kwargs)  # type: ignore[arg-type]


def test_each_protocol_gets_its_learner_with_the_setups_parameters() -> None:
    gossip = _make(LearnerSetup("gossip", budget=0.5, params={"period": 2.0}))
    assert isinstance(gossip, GossipLearner)
    assert (gossip.config.period, gossip.config.budget) == (2.0, 0.5)
    server_free = _make(LearnerSetup("server-free", neighbours="range"), neighbours={"b", "c"})
    assert isinstance(server_free, ServerFreeLearner)
    assert server_free.neighbours == {"b", "c"}
    fedavg = _make(LearnerSetup("fedavg", aggregation="median", params={"aggregator": "z"}))
    assert isinstance(fedavg, FedAvgLearner)
    assert (fedavg.config.aggregation, fedavg.config.aggregator) == ("median", "z")


def test_a_rejoining_gossip_node_does_only_its_remaining_trainings() -> None:
    setup = LearnerSetup("gossip", params={"max_rounds": 10})
    assert _make(setup, rounds_done=4).config.max_rounds == 6  # type: ignore[attr-defined]
    assert _make(setup, rounds_done=12).config.max_rounds == 1  # type: ignore[attr-defined]
    rounds_based = LearnerSetup("server-free", params={"max_rounds": 10})
    assert _make(rounds_based, rounds_done=4).config.max_rounds == 10  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("setup", "key", "says"),
    [
        (LearnerSetup("gossip", params={"round_timeout": 3.0}), "params.round_timeout", "period"),
        (LearnerSetup("krum"), "protocol", "known: gossip, server-free, fedavg"),
        (LearnerSetup("gossip", neighbours="range"), "neighbours", "only server-free"),
        (LearnerSetup("server-free", neighbours="task"), "neighbours", "all, topology, range"),
        (LearnerSetup("fedavg", aggregation="bulyan"), "aggregation", "'bulyan'"),
        (LearnerSetup("gossip", params={"max_rounds": 0}), "params", "at least 1"),
    ],
)
def test_a_setup_the_factory_refuses_names_the_key(
    setup: LearnerSetup, key: str, says: str
) -> None:
    with pytest.raises(SetupError) as info:
        _make(setup)
    assert info.value.key == key
    assert says in info.value.problem


def test_check_setup_needs_no_model() -> None:
    check_setup(LearnerSetup("server-free", params={"round_timeout": 1.0}, neighbours="topology"))
    assert "budget" not in parameters("gossip") and "period" in parameters("gossip")


def test_the_learner_it_makes_runs() -> None:
    machine = _make(LearnerSetup("server-free"))
    assert any(isinstance(a, Train) for a in machine.handle(Start(), 0.0))  # type: ignore[attr-defined]


def test_the_daemon_builds_its_learner_by_the_factory(tmp_path: Path) -> None:
    path = tmp_path / "p2pfl.toml"
    text = '[trust]\nmode = "open"\n[task]\nepochs = 0.5\n[protocol.params]\nmax_rounds = 10\n'
    path.write_text(text)
    machine = build_machine(load_config(path), "a", WEIGHTS, rounds_done=4)
    assert isinstance(machine, GossipLearner)
    # A daemon resuming from a checkpoint at training 4 does what is left, like a virtual node.
    assert (machine.config.max_rounds, machine.config.budget) == (6, 0.5)
    path.write_text(text + "round_timeout = 3.0\n")
    with pytest.raises(ConfigError) as info:
        build_machine(load_config(path), "a", WEIGHTS)
    assert str(info.value).startswith(f"{path}:7: protocol.params.round_timeout: not a param")
