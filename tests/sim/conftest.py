"""Small scenarios on the real digits data (logistic regression: a few ms per training)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from p2pfl.sim.scenario import Scenario, parse_scenario

BASE: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "task": {"name": "digits-logreg", "nodes": 6, "partition": "iid"},
    "training": {"epochs": 1.0, "samples_per_s": 250.0, "eval_interval": 5.0},
    "network": {"latency_ms": 5.0, "bandwidth_mbps": 10.0, "detect_s": 1.0},
    "stop": {"time": 25.0},
    "setup": [
        {"name": "gossip", "protocol": "gossip", "period": 1.0},
        {"name": "server-free", "protocol": "server-free", "round_timeout": 2.0},
        {"name": "fedavg", "protocol": "fedavg", "round_timeout": 2.0},
    ],
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def tiny() -> Callable[..., Scenario]:
    """``tiny(**changes)``: the base scenario with tables merged key by key."""

    def build(**changes: Any) -> Scenario:
        return parse_scenario(_merge(BASE, changes), "tiny.toml")

    return build


@pytest.fixture
def tiny_dict() -> dict[str, Any]:
    return copy.deepcopy(BASE)
