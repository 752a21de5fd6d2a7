"""The one action interpreter: the same meaning of every action in the daemon and the engine."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from p2pfl.daemon import driver as daemon_driver
from p2pfl.learning.factory import make_learner
from p2pfl.learning.ops import StateDictOps
from p2pfl.learning.runtime import LearnerRuntime
from p2pfl.learning.setup import parse_setup
from p2pfl.protocols import (
    MessageReceived,
    PeerUp,
    Start,
    TrainingDone,
    UseFeatures,
)
from p2pfl.protocols._messages import GossipModel
from p2pfl.sim import virtual


class _Recorder:
    """A host that keeps what it was asked to do (the engines' hosts do the real work)."""

    def __init__(self, metrics: Mapping[str, float] | None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.metrics = metrics

    def send(self, peer: str, message: Any) -> None:
        self.calls.append(("send", peer))

    def train(self, weights: Any, budget: float) -> None:
        self.calls.append(("train", budget))

    def evaluate(self, weights: Any) -> Mapping[str, float] | None:
        self.calls.append(("evaluate",))
        return self.metrics

    def adopt(self, weights: Any) -> None:
        self.calls.append(("adopt",))

    def penalize(self, peer: str, reason: str) -> None:
        self.calls.append(("penalize", peer))

    def use_features(self, action: UseFeatures) -> None:
        self.calls.append(("features", action.peer))

    def metric(self, name: str, value: float) -> None:
        self.calls.append(("metric", name, value))

    def log(self, level: str, message: str) -> None:
        self.calls.append(("log", level))

    def dropped(self, reason: str, count: int, peer: str | None, *, local: bool) -> None:
        self.calls.append(("dropped", reason, count, peer, local))

    def deadline(self, at: float | None) -> None:
        self.calls.append(("deadline", at))


WEIGHTS = {"w": torch.zeros(4)}


def _runtime(
    metrics: Mapping[str, float] | None, protocol: str = "gossip", **setup: Any
) -> tuple[Any, _Recorder]:
    learner = make_learner(
        parse_setup({"protocol": protocol, **setup}),
        "a",
        WEIGHTS,
        StateDictOps(),
        random.Random(0),
    )
    host = _Recorder(metrics)
    return LearnerRuntime(learner, host, lambda: 0.0), host


def test_an_evaluation_the_machine_asks_for_is_fed_back_as_evaluation_done() -> None:
    runtime, host = _runtime({"accuracy": 0.5}, "server-free", evaluate_every=1)
    runtime.handle(Start())
    runtime.handle(TrainingDone({"w": torch.ones(4)}, _Report()))  # a round alone: closed
    assert ("evaluate",) in host.calls
    # The machine turned the fed-back figures into a metric: the runtime handed them in.
    assert ("metric", "eval_accuracy", 0.5) in host.calls
    assert host.calls[-1][0] == "deadline"


def test_drops_are_counted_after_each_event_and_attributed_to_the_sender() -> None:
    runtime, host = _runtime(None, max_norm=0.5)
    runtime.handle(Start())
    runtime.handle(PeerUp("b"))
    far = GossipModel(weights={"w": torch.full((4,), 10.0)}, age=1, samples=10)
    runtime.handle(MessageReceived("b", far))
    assert ("dropped", "invalid_update:norm_exceeded", 1, "b", False) in host.calls


def test_an_unknown_action_is_an_error_in_every_host() -> None:
    runtime, _ = _runtime(None)
    with pytest.raises(TypeError, match="unknown protocol action"):
        runtime.perform(object(), deque())
    # The daemon's driver and the virtual engine run this same interpreter.
    assert "LearnerRuntime" in vars(daemon_driver) and "LearnerRuntime" in vars(virtual)


class _Report:
    samples = 10
    loss = 1.0
