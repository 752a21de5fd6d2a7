"""max_peers in the virtual engine: gossip's links are a peer-sampling view of bounded size."""

from __future__ import annotations

from typing import Any

import pytest

from p2pfl.sim import virtual
from p2pfl.sim.scenario import ScenarioError, parse_scenario


def scenario(setups: list[dict[str, Any]], **changes: Any) -> Any:
    raw: dict[str, Any] = {
        "name": "sampling",
        "seed": 3,
        "task": {"name": "digits-logreg", "nodes": 24, "partition": "iid"},
        "training": {"path": "vectorized", "samples_per_s": 200.0, "eval_interval": 5.0},
        "network": {"topology": "full", "latency_ms": 5.0, "detect_s": 1.0},
        "stop": {"time": 40.0},
        "setup": setups,
        **changes,
    }
    return parse_scenario(raw, "sampling.toml")


def test_views_stay_bounded_through_churn_and_gossip_still_learns() -> None:
    churn = {"fraction": 0.25, "start": 5.0, "end": 15.0, "downtime": 5.0}
    setups = [
        {"name": "full", "protocol": "gossip", "period": 1.0},
        {"name": "view4", "protocol": "gossip", "period": 1.0, "max_peers": 4},
    ]
    results = {s.name: s for s in virtual.run(scenario(setups, churn=churn)).setups}
    bounded = results["view4"]
    assert all(n.extra["largest_view"] <= 4 for n in bounded.nodes)
    assert all(0 < len(n.extra["view"]) <= 4 for n in bounded.nodes)
    assert all(n.node not in n.extra["view"] for n in bounded.nodes)
    assert all(n.extra["shuffles"] >= 30 for n in bounded.nodes)
    # Honest shuffles are not refused (a peer's share is sometimes full; churned targets time
    # out); honest neighbour requests are refused only by full nodes.
    reasons = set().union(*(n.extra["sampling_dropped"] for n in bounded.nodes))
    assert reasons <= {"shuffle_entry_over_share", "shuffle_timeout", "neighbour_full"}
    assert all(len(n.extra["passive"]) > 0 for n in bounded.nodes)
    # Links are both ways: the two ends of every link name each other.
    views = {n.node: set(n.extra["view"]) for n in bounded.nodes if n.extra["alive"]}
    one_way = [(a, b) for a, peers in views.items() for b in peers if a not in views.get(b, {a})]
    assert one_way == [] and sum(len(peers) for peers in views.values()) > 24
    assert "view" not in results["full"].nodes[0].extra
    initial = bounded.curve[0]["accuracy"]
    assert bounded.final["accuracy"] > initial + 0.3
    assert bounded.final["accuracy"] > results["full"].final["accuracy"] - 0.1


@pytest.mark.parametrize("protocol", ["server-free", "fedavg"])
def test_max_peers_is_refused_where_peers_are_fixed(protocol: str) -> None:
    with pytest.raises(ScenarioError, match=r"setup\[0\]\.max_peers: bounds gossip's links"):
        scenario([{"name": "s", "protocol": protocol, "max_peers": 4}])
