"""The setup description and the factory: one description -> a learner, problems named by key."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from p2pfl.daemon.config import ConfigError, load_config
from p2pfl.daemon.node import build_machine
from p2pfl.learning.factory import LearningSetup, SetupError, make_learner, parameters
from p2pfl.learning.ops import StateDictOps
from p2pfl.learning.setup import parse_setup
from p2pfl.protocols import FedAvgLearner, GossipLearner, ServerFreeLearner, Start, Train

WEIGHTS: dict[str, object] = {}


def _make(setup: LearningSetup, **kwargs: object) -> object:
    return make_learner(setup, "a", WEIGHTS, StateDictOps(), random.Random(0), **kwargs)  # type: ignore[arg-type]


def test_each_protocol_gets_its_learner_with_the_setups_parameters() -> None:
    gossip = _make(parse_setup({"protocol": "gossip", "epochs": 0.5, "period": 2.0}))
    assert isinstance(gossip, GossipLearner)
    assert (gossip.config.period, gossip.config.budget) == (2.0, 0.5)
    server_free = _make(
        parse_setup({"protocol": "server-free", "neighbours": "range"}), neighbours={"b", "c"}
    )
    assert isinstance(server_free, ServerFreeLearner)
    assert server_free.neighbours == {"b", "c"}
    fedavg = _make(parse_setup({"protocol": "fedavg", "aggregation": "median", "aggregator": "z"}))
    assert isinstance(fedavg, FedAvgLearner)
    assert (fedavg.config.aggregation, fedavg.config.aggregator) == ("median", "z")


def test_a_rejoining_gossip_node_does_only_its_remaining_trainings() -> None:
    setup = parse_setup({"protocol": "gossip", "max_rounds": 10})
    assert _make(setup, rounds_done=4).config.max_rounds == 6  # type: ignore[attr-defined]
    assert _make(setup, rounds_done=12).config.max_rounds == 1  # type: ignore[attr-defined]
    rounds_based = parse_setup({"protocol": "server-free", "max_rounds": 10})
    assert _make(rounds_based, rounds_done=4).config.max_rounds == 10  # type: ignore[attr-defined]


def test_every_robust_rule_reads_the_outlier_limit() -> None:
    for rule in ("clip", "trimmed_mean", "median", "krum", "multikrum"):
        setup = parse_setup({"protocol": "fedavg", "aggregation": rule, "clip_outlier": 2.5})
        learner = _make(setup)
        assert learner.config.clip_outlier == 2.5  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("values", "key", "says"),
    [
        ({"protocol": "gossip", "round_timeout": 3.0}, "round_timeout", "gossip does not read"),
        ({"protocol": "krum"}, "protocol", '"gossip", "server-free", "fedavg"'),
        ({"protocol": "gossip", "neighbours": "range"}, "neighbours", "only server-free"),
        ({"protocol": "server-free", "neighbours": "task"}, "neighbours", '"all", "topology"'),
        ({"protocol": "fedavg", "aggregation": "bulyan"}, "aggregation", "'bulyan'"),
        ({"protocol": "gossip", "max_rounds": 0}, "max_rounds", "must be >= 1; got 0"),
        ({"protocol": "gossip", "krum_f": 1}, "krum_f", 'the rule "clip" does not read it'),
        ({"protocol": "fedavg", "krum_f": 1}, "krum_f", 'the rule "clip" does not read it'),
        (
            {"protocol": "fedavg", "aggregation": "mean", "clip_outlier": 2.5},
            "clip_outlier",
            'the rule "mean" does not read it',
        ),
        (
            {"protocol": "gossip", "aggregation": "median", "trim_fraction": 0.1},
            "trim_fraction",
            "",
        ),
        (
            {"protocol": "server-free", "range_km": 3.0},
            "range_km",
            'only with neighbours = "range"',
        ),
        # Gossip weighs by age, and these rules count every input alike: a cap changes nothing.
        (
            {"protocol": "gossip", "max_sample_ratio": 2.0},
            "max_sample_ratio",
            "gossip does not read it (a parameter of server-free, fedavg)",
        ),
        *(
            (
                {"protocol": "server-free", "aggregation": rule, "max_sample_ratio": 2.0},
                "max_sample_ratio",
                f'the rule "{rule}" does not read it (only clip, multikrum, mean)',
            )
            for rule in ("trimmed_mean", "median", "krum")
        ),
        (
            {"protocol": "gossip", "clip_radius": 1.0, "clip_scale": 3.0},
            "clip_scale",
            "clip_radius fixes the radius; remove one",
        ),
        ({"protocol": "gossip", "max_norm": 0.0}, "max_norm", "must be > 0"),
        ({"protocol": "gossip", "perod": 1.0}, "perod", "unknown key"),
        ({"protocol": "gossip", "period": True}, "period", "must be a number"),
    ],
)
def test_a_setup_the_validator_refuses_names_the_key(
    values: dict[str, object], key: str, says: str
) -> None:
    with pytest.raises(SetupError) as info:
        parse_setup(values)
    assert info.value.key == key
    assert says in info.value.problem


def test_the_sample_cap_is_read_by_every_weighing_rule_of_both_round_protocols() -> None:
    for protocol in ("server-free", "fedavg"):
        for rule in ("clip", "multikrum", "mean"):
            values = {"protocol": protocol, "aggregation": rule, "max_sample_ratio": 2.0}
            learner = _make(parse_setup(values))
            assert learner.config.max_sample_ratio == 2.0  # type: ignore[attr-defined]


def test_parameters_are_the_protocol_config_fields() -> None:
    parse_setup({"protocol": "server-free", "round_timeout": 1.0, "neighbours": "topology"})
    assert "budget" not in parameters("gossip") and "period" in parameters("gossip")
    assert "round_timeout" not in parameters("gossip") and "krum_f" in parameters("fedavg")


def test_max_norm_bounds_the_learners_update_check() -> None:
    machine = _make(parse_setup({"protocol": "gossip", "max_norm": 2.5}))
    assert machine._ops.max_norm == 2.5  # type: ignore[attr-defined]
    assert _make(parse_setup({"protocol": "gossip"}))._ops.max_norm is None  # type: ignore[attr-defined]


def test_the_learner_it_makes_runs() -> None:
    machine = _make(parse_setup({"protocol": "server-free"}))
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
    assert str(info.value).startswith(
        f"{path}:7: protocol.params.round_timeout: gossip does not read it"
    )
