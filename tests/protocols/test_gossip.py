"""Gossip learning: exact actions and deadlines on scripted scenarios."""

from __future__ import annotations

import random
from typing import Any

import pytest

from p2pfl.protocols import (
    Adopt,
    Evaluate,
    EvaluationDone,
    GossipConfig,
    GossipLearner,
    GossipModel,
    MessageReceived,
    Metric,
    PeerDown,
    PeerUp,
    Penalize,
    Send,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)

CONFIG = GossipConfig(period=10.0, jitter=0.1, budget=2.0, staleness_window=3)


def started(ops: Any, peers: tuple[str, ...] = ("b", "c"), seed: int = 7, **kw: Any) -> Any:
    machine = GossipLearner("a", 1.0, ops, random.Random(seed), kw.pop("config", CONFIG), **kw)
    for peer in peers:
        assert machine.handle(PeerUp(peer), 0.0) == []
    return machine


def test_first_tick_falls_in_the_first_period_from_the_rng(ops: Any) -> None:
    machine = started(ops)
    twin = random.Random(7)
    assert machine.handle(Start(), 0.0) == [SetTimer(10.0 * twin.random())]
    assert machine.next_deadline() == 10.0 * random.Random(7).random()


def test_tick_with_empty_inbox_trains_own_model_and_reschedules(ops: Any) -> None:
    machine = started(ops)
    twin = random.Random(7)
    first = 10.0 * twin.random()
    machine.handle(Start(), 0.0)
    actions = machine.handle(TimerFired(), first)
    assert actions == [Train(1.0, 2.0), SetTimer(first + 10.0 * twin.uniform(0.9, 1.1))]


def test_trained_model_is_adopted_then_sent_to_a_sampled_peer(ops: Any, report: Any) -> None:
    machine = started(ops)
    twin = random.Random(7)
    first = 10.0 * twin.random()
    machine.handle(Start(), 0.0)
    machine.handle(TimerFired(), first)
    twin.uniform(0.9, 1.1)
    peer = ["b", "c"][twin.randrange(2)]
    actions = machine.handle(TrainingDone(1.5, report(40)), first + 1)
    assert actions == [Adopt(1.5), Send(peer, GossipModel(1.5, 1, 40))]
    assert machine.age == 1 and machine.rounds == 1


def test_inbox_keeps_last_two_and_merge_weights_by_age(ops: Any, report: Any) -> None:
    config = GossipConfig(period=10.0, jitter=0.0, staleness_window=100, aggregation="mean")
    machine = started(ops, config=config)
    machine.handle(Start(), 0.0)
    tick = machine.next_deadline()
    for peer, value, age in [("b", 100.0, 1), ("c", 4.0, 2), ("b", 7.0, 3)]:
        assert machine.handle(MessageReceived(peer, GossipModel(value, age, 5)), 1.0) == []
    assert machine.dropped["inbox_overflow"] == 1
    # own 1.0 at age 0 (weight 1), c 4.0 at age 2, b 7.0 at age 3: (1 + 8 + 21) / 6 = 5.0
    assert machine.handle(TimerFired(), tick) == [
        Adopt(5.0),
        Train(5.0, 1.0),
        SetTimer(tick + 10.0),
    ]
    assert machine.age == 3
    # The inbox was consumed: the next tick trains the own model, no re-averaging.
    machine.handle(TrainingDone(6.0, report(5)), tick + 1)
    assert machine.handle(TimerFired(), tick + 10.0) == [Train(6.0, 1.0), SetTimer(tick + 20.0)]


def test_much_newer_model_is_adopted_and_much_older_one_dropped(ops: Any) -> None:
    config = GossipConfig(period=10.0, jitter=0.0, staleness_window=3, aggregation="mean")
    machine = started(ops, config=config)
    machine.handle(Start(), 0.0)
    tick = machine.next_deadline()
    machine.handle(MessageReceived("b", GossipModel(9.0, 8, 5)), 1.0)
    assert machine.handle(TimerFired(), tick)[:2] == [Adopt(9.0), Train(9.0, 1.0)]
    assert machine.age == 8 and machine.dropped["stale_model"] == 1  # our own age-0 model


def test_duplicate_and_reordered_models_are_dropped(ops: Any) -> None:
    machine = started(ops)
    machine.handle(Start(), 0.0)
    machine.handle(MessageReceived("b", GossipModel(2.0, 5, 5)), 1.0)
    assert machine.handle(MessageReceived("b", GossipModel(2.0, 5, 5)), 1.0) == []
    assert machine.handle(MessageReceived("b", GossipModel(3.0, 4, 5)), 2.0) == []
    assert machine.dropped["duplicate"] == 2


def test_peer_that_rejoins_younger_is_heard_again(ops: Any) -> None:
    machine = started(ops)
    machine.handle(Start(), 0.0)
    machine.handle(MessageReceived("b", GossipModel(2.0, 8, 5)), 1.0)
    machine.handle(PeerDown("b"), 2.0)
    machine.handle(PeerUp("b"), 3.0)
    machine.handle(MessageReceived("b", GossipModel(2.5, 1, 5)), 4.0)
    assert machine.dropped["duplicate"] == 0


def test_repeat_offender_is_penalized_once_then_ignored(ops: Any) -> None:
    machine = started(ops)
    machine.handle(Start(), 0.0)
    bad = GossipModel(float("nan"), 1, 5)
    assert machine.handle(MessageReceived("b", bad), 1.0) == []
    assert machine.handle(MessageReceived("b", GossipModel(1e9, 2, 5)), 1.0) == []
    assert machine.handle(MessageReceived("b", bad.__class__(float("inf"), 3, 5)), 1.0) == [
        Penalize("b", "invalid_update:not_finite")
    ]
    assert machine.handle(MessageReceived("b", GossipModel(1.0, 9, 5)), 1.0) == []
    assert machine.dropped["penalized_peer"] == 1
    assert machine.dropped["invalid_update:norm"] == 1
    assert machine.peers == frozenset({"c"})


def test_tick_while_training_is_skipped(ops: Any) -> None:
    machine = started(ops, config=GossipConfig(period=10.0, jitter=0.0))
    machine.handle(Start(), 0.0)
    tick = machine.next_deadline()
    machine.handle(TimerFired(), tick)
    assert machine.handle(TimerFired(), tick + 10.0) == [SetTimer(tick + 20.0)]
    assert machine.skipped_ticks == 1


def test_peer_leaving_is_no_longer_sampled(ops: Any, report: Any) -> None:
    machine = started(ops, config=GossipConfig(period=10.0, jitter=0.0))
    machine.handle(Start(), 0.0)
    machine.handle(TimerFired(), machine.next_deadline())
    machine.handle(PeerDown("b"), 5.0)
    machine.handle(PeerDown("c"), 5.0)
    assert machine.handle(TrainingDone(2.0, report(5)), 6.0) == [Adopt(2.0)]
    assert machine.dropped["no_peer_to_send"] == 1


def test_max_rounds_finishes_and_cancels_the_tick(ops: Any, report: Any) -> None:
    machine = started(ops, config=GossipConfig(period=10.0, jitter=0.0, max_rounds=1))
    machine.handle(Start(), 0.0)
    machine.handle(TimerFired(), machine.next_deadline())
    actions = machine.handle(TrainingDone(2.0, report(5)), 6.0)
    assert actions[-1] == SetTimer(None) and machine.finished
    assert machine.next_deadline() is None


def test_median_rule_is_used_by_name(ops: Any) -> None:
    config = GossipConfig(period=10.0, jitter=0.0, aggregation="median", staleness_window=100)
    machine = started(ops, config=config)
    machine.handle(Start(), 0.0)
    machine.handle(MessageReceived("b", GossipModel(50.0, 1, 5)), 1.0)
    machine.handle(MessageReceived("c", GossipModel(3.0, 1, 5)), 1.0)
    assert machine.handle(TimerFired(), machine.next_deadline())[0] == Adopt(3.0)


def test_unknown_aggregation_rule_is_refused_at_construction(ops: Any) -> None:
    with pytest.raises(ValueError, match="unknown aggregation rule 'bulyan'"):
        GossipLearner("a", 1.0, ops, random.Random(0), GossipConfig(aggregation="bulyan"))


def test_time_going_backwards_is_a_driver_bug(ops: Any) -> None:
    machine = started(ops)
    machine.handle(Start(), 5.0)
    with pytest.raises(ValueError, match="time went backwards"):
        machine.handle(TimerFired(), 4.0)


def test_same_seed_same_script_gives_same_actions(ops: Any, report: Any) -> None:
    def run(seed: int) -> list[object]:
        machine = started(ops, peers=tuple("bcdefg"), seed=seed)
        out: list[object] = list(machine.handle(Start(), 0.0))
        for _ in range(5):
            out += machine.handle(TimerFired(), machine.next_deadline())
            out += machine.handle(TrainingDone(2.0, report(5)), machine.next_deadline() - 1)
        return out

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_evaluation_is_requested_every_k_trainings(ops: Any, report: Any) -> None:
    config = GossipConfig(period=10.0, jitter=0.0, evaluate_every=2)
    machine = started(ops, peers=(), config=config)
    machine.handle(Start(), 0.0)
    tick = machine.next_deadline()
    machine.handle(TimerFired(), tick)
    assert machine.handle(TrainingDone(2.0, report(5)), tick + 1) == [Adopt(2.0)]
    machine.handle(TimerFired(), tick + 10)
    assert machine.handle(TrainingDone(3.0, report(5)), tick + 11) == [Adopt(3.0), Evaluate(3.0)]
    metric = machine.handle(EvaluationDone({"accuracy": 0.5}), tick + 12)
    assert metric == [Metric("eval_accuracy", 0.5)]
