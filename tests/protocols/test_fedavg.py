"""FedAvg: exact actions and deadlines on scripted scenarios, including aggregator hand-over."""

from __future__ import annotations

import random
from typing import Any

from p2pfl.protocols import (
    Adopt,
    Evaluate,
    FedAvgConfig,
    FedAvgLearner,
    GlobalModel,
    Log,
    MessageReceived,
    Metric,
    PeerDown,
    PeerUp,
    Send,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols import RoundUpdate as RU

CONFIG = FedAvgConfig(round_timeout=5.0, budget=1.0, aggregation="mean")


def node(ops: Any, name: str, peers: tuple[str, ...], **kw: Any) -> Any:
    machine = FedAvgLearner(name, 1.0, ops, random.Random(0), kw.pop("config", CONFIG), **kw)
    for peer in peers:
        machine.handle(PeerUp(peer), 0.0)
    return machine


def test_smallest_id_aggregates_broadcasts_and_trains(ops: Any) -> None:
    machine = node(ops, "a", ("c", "b"))
    assert machine.handle(Start(), 0.0) == [
        Send("b", GlobalModel(0, 1.0)),
        Send("c", GlobalModel(0, 1.0)),
        Train(1.0, 1.0),
        SetTimer(5.0),
    ]
    assert machine.is_aggregator


def test_participant_adopts_global_trains_and_reports(ops: Any, report: Any) -> None:
    machine = node(ops, "b", ("a", "c"))
    assert machine.handle(Start(), 0.0) == []
    assert machine.handle(MessageReceived("a", GlobalModel(0, 3.0)), 1.0) == [
        Adopt(3.0),
        Train(3.0, 1.0),
    ]
    assert machine.handle(TrainingDone(4.0, report(7)), 2.0) == [Send("a", RU(0, 4.0, 7))]
    assert machine.model == 3.0  # the global model, not the local update


def test_aggregator_closes_round_when_all_arrived(ops: Any, report: Any) -> None:
    machine = node(ops, "a", ("b", "c"))
    machine.handle(Start(), 0.0)
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 1.0)
    machine.handle(MessageReceived("c", RU(0, 6.0, 10)), 1.5)
    assert machine.handle(TrainingDone(2.0, report(20)), 2.0) == [
        Adopt(3.5),  # (2*20 + 4*10 + 6*10) / 40
        Metric("round_completed", 0),
        Metric("round_models_merged", 3),
        Send("b", GlobalModel(1, 3.5)),
        Send("c", GlobalModel(1, 3.5)),
        Train(3.5, 1.0),
        SetTimer(7.0),
    ]


def test_lost_update_and_late_update(ops: Any, report: Any) -> None:
    machine = node(ops, "a", ("b", "c"))
    machine.handle(Start(), 0.0)
    machine.handle(TrainingDone(2.0, report(10)), 1.0)
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 1.0)
    assert machine.handle(TimerFired(), 5.0)[:3] == [
        Adopt(3.0),
        Metric("round_completed", 0),
        Metric("round_models_merged", 2),
    ]
    assert machine.handle(MessageReceived("c", RU(0, 6.0, 10)), 5.5) == []
    assert machine.handle(MessageReceived("b", RU(1, 6.0, 10)), 5.5) == []
    assert machine.handle(MessageReceived("b", RU(1, 6.0, 10)), 5.6) == []
    assert dict(machine.dropped) == {"late": 1, "duplicate": 1}


def test_own_training_late_at_deadline_does_not_overlap_trainings(ops: Any, report: Any) -> None:
    machine = node(ops, "a", ("b",))
    machine.handle(Start(), 0.0)
    machine.handle(MessageReceived("b", RU(0, 4.0, 10)), 1.0)
    actions = machine.handle(TimerFired(), 5.0)
    assert actions == [
        Adopt(4.0),
        Metric("round_completed", 0),
        Metric("round_models_merged", 1),
        Send("b", GlobalModel(1, 4.0)),
        SetTimer(10.0),
    ]
    # The stale round-0 training finishes: discarded, round 1 training starts on the new global.
    assert machine.handle(TrainingDone(2.0, report(10)), 6.0) == [Train(4.0, 1.0)]


def test_participant_takes_over_when_aggregator_leaves(ops: Any, report: Any) -> None:
    machine = node(ops, "b", ("a", "c"))
    machine.handle(Start(), 0.0)
    machine.handle(MessageReceived("a", GlobalModel(0, 3.0)), 1.0)
    machine.handle(TrainingDone(4.0, report(7)), 2.0)
    assert machine.handle(PeerDown("a"), 3.0) == [
        Log("aggregator a left; taking over at round 1"),
        Send("c", GlobalModel(1, 3.0)),
        Train(3.0, 1.0),
        SetTimer(8.0),
    ]
    assert machine.is_aggregator


def test_other_participant_follows_the_new_aggregator(ops: Any) -> None:
    machine = node(ops, "c", ("a", "b"))
    machine.handle(Start(), 0.0)
    assert machine.handle(PeerDown("a"), 3.0) == [Log("aggregator a left; following b")]
    assert machine.handle(MessageReceived("b", GlobalModel(1, 4.0)), 3.5) == [
        Adopt(4.0),
        Train(4.0, 1.0),
    ]


def test_global_arriving_while_training_waits_for_it(ops: Any, report: Any) -> None:
    machine = node(ops, "b", ("a",))
    machine.handle(Start(), 0.0)
    machine.handle(MessageReceived("a", GlobalModel(0, 3.0)), 1.0)
    assert machine.handle(MessageReceived("a", GlobalModel(1, 5.0)), 2.0) == []
    assert machine.handle(TrainingDone(4.0, report(7)), 3.0) == [Adopt(5.0), Train(5.0, 1.0)]


def test_duplicate_and_old_globals_are_dropped(ops: Any) -> None:
    machine = node(ops, "b", ("a",))
    machine.handle(Start(), 0.0)
    machine.handle(MessageReceived("a", GlobalModel(2, 3.0)), 1.0)
    assert machine.handle(MessageReceived("a", GlobalModel(2, 3.0)), 1.0) == []
    assert machine.handle(MessageReceived("a", GlobalModel(1, 3.0)), 1.0) == []
    assert dict(machine.dropped) == {"duplicate": 1, "late": 1}


def test_aggregator_steps_down_for_a_higher_round(ops: Any, report: Any) -> None:
    machine = node(ops, "a", ("b",))  # e.g. a rejoined with stale state
    machine.handle(Start(), 0.0)
    assert machine.handle(MessageReceived("b", GlobalModel(7, 3.0)), 1.0) == [
        Log("stepping down: b aggregates round 7"),
        SetTimer(None),
    ]
    assert machine.aggregator == "b" and machine.round == 7
    # Its own round-0 training finishes: discarded; it follows b from round 7.
    assert machine.handle(TrainingDone(2.0, report(5)), 2.0) == [Adopt(3.0), Train(3.0, 1.0)]
    assert machine.handle(TrainingDone(4.0, report(5)), 3.0) == [Send("b", RU(7, 4.0, 5))]


def test_configured_aggregator_is_used(ops: Any) -> None:
    machine = node(ops, "a", ("b",), config=FedAvgConfig(aggregator="b"))
    assert machine.handle(Start(), 0.0) == []
    assert machine.aggregator == "b"


def test_update_to_a_participant_is_dropped(ops: Any) -> None:
    machine = node(ops, "b", ("a",))
    machine.handle(Start(), 0.0)
    assert machine.handle(MessageReceived("a", RU(0, 1.0, 1)), 1.0) == []
    assert machine.dropped["not_aggregator"] == 1


def test_final_round_is_broadcast_and_participants_stop(ops: Any, report: Any) -> None:
    config = FedAvgConfig(round_timeout=5.0, max_rounds=1, aggregation="mean")
    agg = node(ops, "a", ("b",), config=config)
    agg.handle(Start(), 0.0)
    agg.handle(TrainingDone(2.0, report(10)), 1.0)
    actions = agg.handle(MessageReceived("b", RU(0, 4.0, 10)), 2.0)
    assert Send("b", GlobalModel(1, 3.0)) in actions and agg.finished
    part = node(ops, "b", ("a",), config=FedAvgConfig(round_timeout=5.0, max_rounds=1))
    part.handle(Start(), 0.0)
    assert part.handle(MessageReceived("a", GlobalModel(1, 3.0)), 3.0)[0] == Adopt(3.0)
    assert part.finished


def test_participant_evaluates_the_global_models_it_adopts(ops: Any) -> None:
    machine = node(ops, "b", ("a",), config=FedAvgConfig(evaluate_every=2))
    machine.handle(Start(), 0.0)
    assert machine.handle(MessageReceived("a", GlobalModel(2, 3.0)), 1.0) == [
        Adopt(3.0),
        Evaluate(3.0),
        Train(3.0, 1.0),
    ]
