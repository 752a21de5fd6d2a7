"""Server-free FL: exact actions and deadlines on scripted scenarios."""

from __future__ import annotations

import random
from typing import Any

from p2pfl.protocols import (
    Adopt,
    Evaluate,
    GossipModel,
    MessageReceived,
    Metric,
    PeerDown,
    PeerUp,
    Send,
    ServerFreeConfig,
    ServerFreeLearner,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols import RoundUpdate as RU

CONFIG = ServerFreeConfig(round_timeout=5.0, budget=1.0, aggregation="mean")


def in_round(ops: Any, report: Any, peers: tuple[str, ...] = ("b", "c"), **kw: Any) -> Any:
    """A node that started, trained round 0 to 2.0 (10 samples) at t=1 and sent it."""
    machine = ServerFreeLearner("a", 1.0, ops, random.Random(0), kw.pop("config", CONFIG), **kw)
    for peer in peers:
        machine.handle(PeerUp(peer), 0.0)
    assert machine.handle(Start(), 0.0) == [Train(1.0, 1.0)]
    machine.handle(TrainingDone(2.0, report(10)), 1.0)
    return machine


def closed(value: float, round_: int, merged: int) -> list[object]:
    return [Adopt(value), Metric("round_completed", round_), Metric("round_models_merged", merged)]


def test_trained_model_goes_to_every_neighbour_with_a_deadline(ops: Any, report: Any) -> None:
    machine = ServerFreeLearner("a", 1.0, ops, random.Random(0), CONFIG)
    for peer in ("c", "b"):
        machine.handle(PeerUp(peer), 0.0)
    machine.handle(Start(), 0.0)
    assert machine.handle(TrainingDone(2.0, report(10)), 1.0) == [
        Send("b", RU(0, 2.0, 10)),
        Send("c", RU(0, 2.0, 10)),
        SetTimer(6.0),
    ]


def test_round_closes_when_all_neighbours_arrived(ops: Any, report: Any) -> None:
    machine = in_round(ops, report)
    assert machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0) == []
    # (2*10 + 4*10 + 8*20) / 40 = 5.5, weighted by samples.
    assert machine.handle(MessageReceived("c", RU(0, 8.0, 20)), 3.0) == [
        *closed(5.5, 0, 3),
        Train(5.5, 1.0),
        SetTimer(None),
    ]
    assert machine.round == 1


def test_lost_message_closes_the_round_at_the_deadline(ops: Any, report: Any) -> None:
    machine = in_round(ops, report)
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)
    assert machine.handle(TimerFired(), 5.9) == []  # early timer: nothing due
    assert machine.handle(TimerFired(), 6.0) == [
        *closed(3.0, 0, 2),
        Train(3.0, 1.0),
        SetTimer(None),
    ]


def test_peer_leaving_mid_round_closes_it_without_waiting(ops: Any, report: Any) -> None:
    machine = in_round(ops, report)
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)
    assert machine.handle(PeerDown("c"), 2.5) == [
        *closed(3.0, 0, 2),
        Train(3.0, 1.0),
        SetTimer(None),
    ]


def test_peer_joining_mid_round_is_expected_from_the_next_round(ops: Any, report: Any) -> None:
    machine = in_round(ops, report, peers=("b",))
    assert machine.handle(PeerUp("c"), 1.5) == []
    assert machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)[:3] == closed(3.0, 0, 2)
    assert machine.handle(TrainingDone(3.0, report(10)), 3.0)[:2] == [
        Send("b", RU(1, 3.0, 10)),
        Send("c", RU(1, 3.0, 10)),
    ]


def test_duplicate_late_and_far_ahead_updates_are_dropped(ops: Any, report: Any) -> None:
    machine = in_round(ops, report)
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)
    assert machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0) == []
    assert machine.handle(MessageReceived("b", RU(3, 4.0, 10)), 2.0) == []
    machine.handle(TimerFired(), 6.0)
    assert machine.handle(MessageReceived("c", RU(0, 8.0, 10)), 6.5) == []
    assert dict(machine.dropped) == {"duplicate": 1, "round_clamped": 1, "late": 1}


def test_update_for_next_round_is_buffered_and_used(ops: Any, report: Any) -> None:
    machine = in_round(ops, report, peers=("b",))
    assert machine.handle(MessageReceived("b", RU(1, 9.0, 10)), 1.5) == []
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)
    actions = machine.handle(TrainingDone(5.0, report(10)), 3.0)
    assert actions == [Send("b", RU(1, 5.0, 10)), *closed(7.0, 1, 2), Train(7.0, 1.0)]


def test_node_far_behind_catches_up_with_its_neighbours(ops: Any, report: Any) -> None:
    machine = in_round(ops, report, peers=("b",))
    machine.handle(MessageReceived("b", RU(2, 6.0, 10)), 2.0)  # b is two rounds ahead
    machine.handle(TimerFired(), 6.0)
    assert machine.round == 2
    assert machine.handle(TrainingDone(4.0, report(10)), 7.0)[:2] == [
        Send("b", RU(2, 4.0, 10)),
        *closed(5.0, 2, 2)[:1],
    ]


def test_restarted_node_jumps_to_the_round_of_most_neighbours(ops: Any, report: Any) -> None:
    machine = in_round(ops, report, peers=("b", "c", "d"))
    for peer, round_ in [("b", 40), ("c", 41), ("d", 10**6)]:  # d lies about its round
        assert machine.handle(MessageReceived(peer, RU(round_, 3.0, 10)), 2.0) == []
    assert machine.dropped["round_clamped"] == 3
    machine.handle(TimerFired(), 6.0)
    assert machine.round == 41


def test_neighbour_policy_limits_sends_and_receives(ops: Any, report: Any) -> None:
    machine = in_round(ops, report, neighbours={"b"})
    assert machine.handle(MessageReceived("c", RU(0, 8.0, 10)), 2.0) == []
    assert machine.dropped["not_neighbour"] == 1
    assert machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)[0] == Adopt(3.0)


def test_gossip_message_is_dropped_as_wrong_protocol(ops: Any, report: Any) -> None:
    machine = in_round(ops, report)
    assert machine.handle(MessageReceived("b", GossipModel(4.0, 1, 10)), 2.0) == []
    assert machine.dropped["wrong_protocol"] == 1


def test_rejected_update_leaves_the_round_waiting(ops: Any, report: Any) -> None:
    machine = in_round(ops, report)
    assert machine.handle(MessageReceived("b", RU(0, float("nan"), 10)), 2.0) == []
    machine.handle(MessageReceived("c", RU(0, 8.0, 10)), 2.0)
    assert machine.handle(TimerFired(), 6.0)[0] == Adopt(5.0)
    assert machine.dropped["invalid_update:not_finite"] == 1


def test_max_rounds_stops_training(ops: Any, report: Any) -> None:
    machine = in_round(ops, report, config=ServerFreeConfig(round_timeout=5.0, max_rounds=1))
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)
    actions = machine.handle(MessageReceived("c", RU(0, 8.0, 10)), 2.0)
    assert not any(isinstance(a, Train) for a in actions) and machine.finished


def test_evaluation_follows_the_round_that_completes_it(ops: Any, report: Any) -> None:
    config = ServerFreeConfig(round_timeout=5.0, evaluate_every=1, aggregation="mean")
    machine = in_round(ops, report, peers=("b",), config=config)
    assert machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0) == [
        *closed(3.0, 0, 2),
        Evaluate(3.0),
        Train(3.0, 1.0),
        SetTimer(None),
    ]


def test_an_inflated_round_counts_for_the_furthest_buffered_round(ops: Any, report: Any) -> None:
    config = ServerFreeConfig(round_timeout=5.0, budget=1.0, aggregation="mean", max_ahead=1)
    machine = in_round(ops, report, config=config)
    # b claims round 1000 at round 0: rejected (counted), its model kept for round 0 + 1.
    assert machine.handle(MessageReceived("b", RU(1000, 6.0, 10)), 1.5) == []
    assert machine.dropped["round_clamped"] == 1 and machine.round == 0
    # A second inflated claim for the same clamped round is a duplicate, not a second vote.
    assert machine.handle(MessageReceived("b", RU(1001, 9.0, 10)), 1.6) == []
    assert machine.dropped["duplicate"] == 1
    machine.handle(MessageReceived("c", RU(1, 8.0, 10)), 1.7)
    machine.handle(MessageReceived("c", RU(0, 4.0, 10)), 1.8)
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)  # round 0 closes
    assert machine.round == 1  # the lower median of (1001, 1), not b's claim
    # Round 1 needs no timeout for b: its clamped model is already there, (5 + 6 + 8) / 3.
    assert machine.handle(TrainingDone(5.0, report(10)), 3.0) == [
        Send("b", RU(1, 5.0, 10)),
        Send("c", RU(1, 5.0, 10)),
        *closed(19.0 / 3, 1, 3),
        Train(19.0 / 3, 1.0),
    ]
