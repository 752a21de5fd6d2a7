"""Every key of the learning setup has an effect: a tiny virtual run per key, against a baseline.

The table below has one row per key of ``LearningSetup`` (``test_the_table_covers_every_key``
fails when a key is added without a row). Each row runs the same tiny scenario twice in the
virtual engine, with and without the key (``with_key`` / ``baseline`` setup values), and asserts
what the key changed in the results, not only that it parsed. The daemon reads the same
description (``tests/learning/test_setup_roundtrip.py``); ``test_the_daemons_apply_the_keys``
runs real daemons with the keys only they can show (the update norm bound, the codec).
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from p2pfl.learning.ops import TaskWorkload
from p2pfl.learning.setup import SETUP_KEYS
from p2pfl.ml import load_graph, partition_cloudlets
from p2pfl.sim import virtual
from p2pfl.sim.results import SetupResult
from p2pfl.sim.scenario import Scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "name": "every-key",
    "seed": 5,
    "task": {"name": "digits-logreg", "nodes": 6, "partition": "iid"},
    "training": {"epochs": 1.0, "samples_per_s": 250.0, "eval_interval": 5.0},
    "network": {"latency_ms": 5.0, "bandwidth_mbps": 10.0, "detect_s": 1.0},
    "stop": {"time": 15.0},
}

Check = Callable[[SetupResult, SetupResult, int], None]


@dataclass(frozen=True)
class Row:
    protocol: str
    with_key: dict[str, Any]
    check: Check
    baseline: dict[str, Any] = field(default_factory=dict)
    scenario: dict[str, Any] = field(default_factory=dict)
    baseline_scenario: dict[str, Any] | None = None
    """The baseline's scenario changes (None: the same as the row's)."""


def _dropped(result: SetupResult, reason: str) -> int:
    return sum(int(n.extra["dropped"].get(reason, 0)) for n in result.nodes)


def _more_drops(reason: str) -> Check:
    def check(on: SetupResult, off: SetupResult, _evals: int) -> None:
        assert _dropped(on, reason) > _dropped(off, reason), reason

    return check


def _differs(on: SetupResult, off: SetupResult, _evals: int) -> None:
    assert [p["accuracy"] for p in on.curve] != [p["accuracy"] for p in off.curve]


def _rounds(result: SetupResult) -> float:
    return sum(n.rounds for n in result.nodes) / len(result.nodes)


def _bytes_per_message(result: SetupResult) -> float:
    return result.bytes_sent / sum(int(n.extra["messages_sent"]) for n in result.nodes)


def _check_protocol(on: SetupResult, off: SetupResult, _evals: int) -> None:
    assert (on.protocol, off.protocol) == ("server-free", "gossip")
    assert all("models_sent_to" in n.extra for n in on.nodes)


def _check_aggregator(on: SetupResult, off: SetupResult, _evals: int) -> None:
    def busiest(result: SetupResult) -> str:
        return max(result.nodes, key=lambda n: n.bytes_sent).node

    assert (busiest(on), busiest(off)) == ("n003", "n000")


def _check_penalized(on: SetupResult, off: SetupResult, _evals: int) -> None:
    assert any(n.extra["penalized"] for n in on.nodes)
    assert not any(n.extra["penalized"] for n in off.nodes)


def _check_max_rounds(on: SetupResult, off: SetupResult, _evals: int) -> None:
    assert {n.rounds for n in on.nodes} == {2} and _rounds(off) > 2


def _check_evaluate_every(on: SetupResult, off: SetupResult, evals: int) -> None:
    assert evals > 0  # evaluations the machines asked for (Evaluate -> EvaluationDone)


SPREAD = {"training": {"speed_spread": 0.6}}

TABLE: dict[str, Row] = {
    "protocol": Row("gossip", {"protocol": "server-free"}, _check_protocol),
    "aggregation": Row("gossip", {"aggregation": "median"}, _differs),
    "epochs": Row(
        "fedavg",
        {"epochs": 0.25},
        lambda on, off, _: _check(_rounds(on) > _rounds(off)),
    ),
    "codec": Row(
        "fedavg",
        {"codec": "int8"},
        lambda on, off, _: _check(_bytes_per_message(on) < 0.5 * _bytes_per_message(off)),
    ),
    "neighbours": Row("server-free", {}, lambda *_: None),  # PEER_SET_KEYS
    "range_km": Row("server-free", {}, lambda *_: None),  # PEER_SET_KEYS
    "max_norm": Row("gossip", {"max_norm": 1e-6}, _more_drops("invalid_update:norm_exceeded")),
    "clip_radius": Row(
        "gossip", {"aggregation": "clip", "clip_radius": 0.0}, _differs, {"aggregation": "clip"}
    ),
    "clip_scale": Row(
        "gossip", {"aggregation": "clip", "clip_scale": 0.05}, _differs, {"aggregation": "clip"}
    ),
    # 1 x the median received distance: about half the received models are outliers.
    "clip_outlier": Row(
        "gossip",
        {"aggregation": "clip", "clip_outlier": 1.0},
        _more_drops("clip_outlier"),
        {"aggregation": "clip", "clip_outlier": float("inf")},
    ),
    # A radius that binds (the default scale, 4 median distances, rarely does in this small run).
    "clip_window": Row(
        "gossip",
        {"aggregation": "clip", "clip_scale": 1.0, "clip_window": 1},
        _differs,
        {"aggregation": "clip", "clip_scale": 1.0},
    ),
    "clip_iterations": Row(
        "gossip",
        {"aggregation": "clip", "clip_scale": 1.0, "clip_iterations": 3},
        _differs,
        {"aggregation": "clip", "clip_scale": 1.0},
    ),
    "krum_f": Row(
        "fedavg", {"aggregation": "multikrum", "krum_f": 0}, _differs, {"aggregation": "multikrum"}
    ),
    "krum_m": Row(
        "fedavg", {"aggregation": "multikrum", "krum_m": 1}, _differs, {"aggregation": "multikrum"}
    ),
    "trim_fraction": Row(
        "fedavg",
        {"aggregation": "trimmed_mean", "trim_fraction": 0.0},
        _differs,
        {"aggregation": "trimmed_mean"},
    ),
    # A scenario's spelling of max_rounds is stop.rounds (max_rounds in [[setup]] is refused).
    "max_rounds": Row("fedavg", {"stop": {"time": 15.0, "rounds": 2}}, _check_max_rounds),
    "max_sample_ratio": Row(
        "fedavg",
        {"max_sample_ratio": 1.0},
        _more_drops("samples_capped"),
        scenario={"task": {"partition": "quantity", "alpha": 0.3}},
    ),
    "strikes_to_penalize": Row(
        "gossip",
        {"max_norm": 1e-6, "strikes_to_penalize": 1},
        _check_penalized,
        {"max_norm": 1e-6, "strikes_to_penalize": 100_000},
    ),
    "evaluate_every": Row("server-free", {"evaluate_every": 1}, _check_evaluate_every),
    "period": Row(
        "gossip", {"period": 0.5}, lambda on, off, _: _check(on.bytes_sent > 2 * off.bytes_sent)
    ),
    "jitter": Row("gossip", {"jitter": 0.0}, _differs),
    "staleness_window": Row(
        "gossip",
        {"staleness_window": 0, "period": 0.5},
        _more_drops("stale_model"),
        {"period": 0.5},
    ),
    "max_age_lead": Row(
        "gossip",
        {"max_age_lead": 0, "period": 0.5},
        _more_drops("age_clamped"),
        {"period": 0.5},
        scenario=SPREAD,
    ),
    "inbox_size": Row(
        "gossip",
        {"inbox_size": 1, "period": 3.0},
        _more_drops("inbox_overflow"),
        {"period": 3.0},
    ),
    "round_timeout": Row(
        "server-free", {"round_timeout": 0.05}, _more_drops("late"), scenario=SPREAD
    ),
    "max_ahead": Row(
        "server-free",
        {"max_ahead": 0, "round_timeout": 0.3},
        _more_drops("round_clamped"),
        {"round_timeout": 0.3},
        scenario=SPREAD,
    ),
    "aggregator": Row("fedavg", {"aggregator": "n003"}, _check_aggregator),
    # Links from peer sampling: each view holds at most 2 of the 5 others, refreshed by shuffles.
    "max_peers": Row(
        "gossip",
        {"max_peers": 2},
        lambda on, off, _: _check(
            all(n.extra["largest_view"] <= 2 and n.extra["shuffles"] >= 2 for n in on.nodes)
            and not any("view" in n.extra for n in off.nodes)
        ),
    ),
    # The training keys (tests/daemon/test_trainer_training_keys.py: the daemon's trainer gives
    # the same factors and weights; test_the_daemons_apply_the_keys: real daemons apply them).
    "lr_schedule": Row("fedavg", {"lr_schedule": "cosine", "lr_final": 0.0}, _differs),
    "lr_final": Row(
        "fedavg",
        {"lr_schedule": "cosine", "lr_final": 0.0},
        _differs,
        {"lr_schedule": "cosine", "lr_final": 1.0},
    ),
    "keep_optimizer": Row("fedavg", {"keep_optimizer": True}, _differs),
}


def _check(condition: bool) -> None:
    assert condition


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Counting:
    """The real workload, counting evaluations (the machines' requests and evaluation points)."""

    def __init__(self, scenario: Scenario) -> None:
        self.inner = TaskWorkload(scenario)
        self.evaluations = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def evaluate(self, weights: Any, node: int | None = None) -> dict[str, float]:
        self.evaluations += 1
        return self.inner.evaluate(weights, node)


def _run(row: Row, setup: dict[str, Any], changes: dict[str, Any]) -> tuple[SetupResult, int]:
    raw = _merge(BASE, changes)
    raw["setup"] = [{"name": "s", "protocol": row.protocol, **setup}]
    scenario = parse_scenario(raw, "every-key.toml")
    workload = _Counting(scenario)
    (result,) = virtual.run(scenario, workload=workload).setups  # type: ignore[arg-type]
    return result, workload.evaluations


def test_the_table_covers_every_key() -> None:
    assert set(TABLE) == set(SETUP_KEYS)


PEER_SET_KEYS = ("neighbours", "range_km")
"""Keys whose effect is the peer sets: test_neighbours_sets_the_peers_each_learner_exchanges_with,
test_range_km_narrows_the_peer_sets."""


@pytest.mark.parametrize("key", sorted(set(TABLE) - set(PEER_SET_KEYS)))
def test_each_setup_key_changes_what_the_virtual_engine_does(key: str) -> None:
    row = TABLE[key]
    on, evals_on = _run(row, row.with_key, row.scenario)
    base = row.scenario if row.baseline_scenario is None else row.baseline_scenario
    off, evals_off = _run(row, row.baseline, base)
    row.check(on, off, evals_on - evals_off)


def test_range_km_narrows_the_peer_sets() -> None:
    """range_km needs node positions (graph tasks): its effect is the peer sets the engine
    resolves; tests/learning/test_neighbours.py runs METR-LA with them in both engines."""
    path = ROOT / "simulations" / "traffic-metr-la.toml"
    raw = tomllib.loads(path.read_text())
    (server_free,) = [s for s in raw["setup"] if s["protocol"] == "server-free"]
    graph = load_graph("metr-la")
    task = SimpleNamespace(graph=graph, partition=partition_cloudlets(graph))

    def peers(**setup: Any) -> int:
        raw["setup"] = [{**server_free, **setup}]
        scenario = parse_scenario(raw, str(path))
        run = virtual._SetupRun(scenario, scenario.setups[0], SimpleNamespace(task=task), None)  # type: ignore[arg-type]
        return sum(len(s or ()) for s in run.peer_sets)

    assert peers(range_km=5.0) < peers() < peers(range_km=500.0)


def test_neighbours_sets_the_peers_each_learner_exchanges_with() -> None:
    """ "topology": each server-free learner exchanges with its links only ("all": None, every
    live peer). In this engine a node's live peers are its links anyway, so the two runs
    agree; in the daemon, where every member is reachable, the set decides (the daemons read
    the same sets: tests/learning/test_setup_roundtrip.py)."""
    changes = {"network": {"topology": "random", "degree": 2}}
    raw = _merge(BASE, changes)
    raw["setup"] = [
        {"name": "topology", "protocol": "server-free", "neighbours": "topology"},
        {"name": "all", "protocol": "server-free"},
    ]
    scenario = parse_scenario(raw, "every-key.toml")
    workload = TaskWorkload(scenario)
    linked, every = (virtual._SetupRun(scenario, s, workload, None) for s in scenario.setups)
    for node, peers in zip(linked.nodes, linked.peer_sets, strict=True):
        assert peers == {linked.ids[j] for j in node.neighbours}
    assert every.peer_sets == [None] * len(every.nodes)
    results = virtual.run(scenario, workload=workload).setups
    for node in results[0].nodes:
        assert set(node.extra["models_sent_to"]) <= set(
            linked.peer_sets[linked.ids.index(node.node)] or ()
        )
