"""Insider attacks: exact actions of a wrapped honest machine (float models), tensor math."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from p2pfl.learning.attacks import Attack, AttackingLearner, attacked_model, flip_labels
from p2pfl.protocols import (
    Adopt,
    FedAvgConfig,
    FedAvgLearner,
    GlobalModel,
    GossipConfig,
    GossipLearner,
    GossipModel,
    MessageReceived,
    PeerUp,
    RoundUpdate,
    Send,
    ServerFreeConfig,
    ServerFreeLearner,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from tests.protocols.conftest import FloatOps, Report

GOSSIP = GossipConfig(period=10.0, jitter=0.0, budget=2.0, aggregation="mean")


def attacker(attack: Attack, ops: Any = None) -> tuple[AttackingLearner[float], float]:
    """Gossip node "a" (peers b, c; c a fellow attacker) wrapped by ``attack``; its first tick."""
    inner = GossipLearner("a", 1.0, ops or FloatOps(), random.Random(7), GOSSIP)
    machine = AttackingLearner(inner, attack, colluders=["c"])
    for peer in ("b", "c"):
        assert machine.handle(PeerUp(peer), 0.0) == []
    machine.handle(Start(), 0.0)
    tick = machine.next_deadline()
    assert tick is not None
    return machine, tick


def two_trainings(machine: AttackingLearner[float], tick: float) -> list[list[Any]]:
    """1.0 trains to 1.5 (sent to b); b's 2.0 and c's 1.0 arrive; their mean 1.5 trains to 2.5."""
    out = [
        machine.handle(TimerFired(), tick),
        machine.handle(TrainingDone(1.5, Report(5)), tick + 1),
    ]
    machine.handle(MessageReceived("b", GossipModel(2.0, 1, 5)), tick + 2)
    machine.handle(MessageReceived("c", GossipModel(1.0, 1, 5)), tick + 2)
    out.append(machine.handle(TimerFired(), tick + 10))
    out.append(machine.handle(TrainingDone(2.5, Report(5)), tick + 11))
    return out


def test_the_attack_waits_for_its_start_then_replaces_every_model_sent() -> None:
    machine, tick = attacker(Attack("scale", factor=10.0, start=10.0))
    assert tick < 10.0 < tick + 11
    first, first_done, second, second_done = two_trainings(machine, tick)
    assert first == [Train(1.0, 2.0), SetTimer(tick + 10)]
    # Before start: the honest send.
    assert first_done == [Adopt(1.5), Send("b", GossipModel(1.5, 1, 5))]
    # The honest machine merged b's and c's models (mean of ages 1, 1, 1) and trained on.
    assert second[:2] == [Adopt(1.5), Train(1.5, 2.0)]
    # After start: the model is scaled; the honest machine keeps its own model.
    assert second_done == [Adopt(2.5), Send("b", GossipModel(25.0, 2, 5))]
    assert machine.model == 2.5 and machine.rounds == 2 and machine.tampered == 1


def test_start_round_counts_the_honest_machines_completed_rounds() -> None:
    machine, tick = attacker(Attack("sign-flip", start_round=2))
    _, first_done, _, second_done = two_trainings(machine, tick)
    assert first_done[-1] == Send("b", GossipModel(1.5, 1, 5))  # one round done: honest
    assert second_done[-1] == Send("b", GossipModel(-2.5, 2, 5))


@pytest.mark.parametrize(
    ("attack", "sent"),
    [
        (Attack("sign-flip", magnitude=2.0), -5.0),
        (Attack("scale", factor=-3.0), -7.5),
        (Attack("inflation", lead=50), 2.5),
        (Attack("label-flip"), 2.5),
        # Deltas from the reference 1.5 (c's model is a colluder's, not honest): b's 0.5, the
        # own 1.0; their mean 0.75, their standard deviation 0.25.
        (Attack("alie", z=1.0), 1.5 + 0.75 - 0.25),
        (Attack("alie", z=3.0), 1.5 + 0.75 - 0.75),
        (Attack("ipm", epsilon=0.5), 1.5 - 0.375),
        (Attack("ipm", epsilon=4.0), 1.5 - 3.0),
    ],
)
def test_each_kind_sends_its_exact_model(attack: Attack, sent: float) -> None:
    machine, tick = attacker(attack)
    *_, second_done = two_trainings(machine, tick)
    age = 2 + 50 if attack.kind == "inflation" else 2
    assert second_done == [Adopt(2.5), Send("b", GossipModel(sent, age, 5))]
    assert machine.tampered == (0 if attack.kind == "label-flip" else 2)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_models_are_struck_by_an_honest_receiver(kind: str) -> None:
    machine, tick = attacker(Attack(kind))
    machine.handle(TimerFired(), tick)
    (_, send) = machine.handle(TrainingDone(1.5, Report(5)), tick + 1)
    assert isinstance(send, Send) and isinstance(send.message, GossipModel)
    value = send.message.weights
    assert math.isnan(value) if kind == "nan" else value == math.inf
    victim = GossipLearner("b", 1.0, FloatOps(), random.Random(1), GOSSIP)
    victim.handle(PeerUp("a"), 0.0)
    victim.handle(Start(), 0.0)
    assert victim.handle(MessageReceived("a", send.message), tick + 1) == []
    assert victim.dropped == {"invalid_update:not_finite": 1}


def test_an_inflated_age_is_clamped_by_the_honest_receiver_not_adopted() -> None:
    machine, tick = attacker(Attack("inflation", lead=10**6))
    machine.handle(TimerFired(), tick)
    (_, send) = machine.handle(TrainingDone(1.5, Report(5)), tick + 1)
    assert send == Send("b", GossipModel(1.5, 1 + 10**6, 5))
    victim = GossipLearner("b", 1.0, FloatOps(), random.Random(1), GOSSIP)
    victim.handle(PeerUp("a"), 0.0)
    victim.handle(Start(), 0.0)
    victim.handle(MessageReceived("a", send.message), tick + 1)
    assert victim.dropped == {"age_clamped": 1} and victim.model == 1.0
    # The model is kept at the age the victim can check (its own, 0), not 1 + 10**6.
    assert [age for _, _, age in victim._inbox] == [0]


def test_round_claims_are_inflated_in_server_free_and_fedavg() -> None:
    attack = Attack("inflation", lead=7)
    sf = AttackingLearner(
        ServerFreeLearner("a", 1.0, FloatOps(), random.Random(0), ServerFreeConfig()), attack
    )
    sf.handle(PeerUp("b"), 0.0)
    assert sf.handle(Start(), 0.0)[0] == Train(1.0, 1.0)
    sent = [a for a in sf.handle(TrainingDone(2.0, Report(3)), 1.0) if isinstance(a, Send)]
    assert sent == [Send("b", RoundUpdate(7, 2.0, 3))]
    # FedAvg: "a" is the aggregator (smallest live id); its global model claims round + 7.
    fa = AttackingLearner(
        FedAvgLearner("a", 1.0, FloatOps(), random.Random(0), FedAvgConfig()), attack
    )
    fa.handle(PeerUp("b"), 0.0)
    sent = [a for a in fa.handle(Start(), 0.0) if isinstance(a, Send)]
    assert sent == [Send("b", GlobalModel(7, 1.0))]
    assert fa.is_aggregator and fa.round == 0  # the honest machine's own state is untouched


def test_a_model_sent_to_several_peers_is_attacked_once() -> None:
    sf = AttackingLearner(
        ServerFreeLearner("a", 1.0, FloatOps(), random.Random(0), ServerFreeConfig()),
        Attack("ipm", epsilon=2.0),
    )
    for peer in ("b", "c"):
        sf.handle(PeerUp(peer), 0.0)
    sf.handle(Start(), 0.0)
    sent = [a for a in sf.handle(TrainingDone(2.0, Report(3)), 1.0) if isinstance(a, Send)]
    # Only its own update (+1.0) is known: IPM sends 1.0 - 2.0 * 1.0 to both peers.
    assert sent == [Send("b", RoundUpdate(0, -1.0, 3)), Send("c", RoundUpdate(0, -1.0, 3))]
    assert sf.tampered == 2


def test_state_dict_models_attack_float_tensors_and_keep_integer_buffers() -> None:
    def model(w: list[float]) -> dict[str, torch.Tensor]:
        return {"w": torch.tensor(w), "steps": torch.tensor(3)}

    ref, honest = model([0.0, 0.0]), [model([1.0, 2.0]), model([3.0, 2.0])]
    alie = attacked_model(Attack("alie", z=2.0), honest[1], ref, honest)
    assert alie["w"].tolist() == [2.0 - 2.0, 2.0] and alie["steps"].item() == 3
    ipm = attacked_model(Attack("ipm", epsilon=0.5), honest[1], ref, honest)
    assert ipm["w"].tolist() == [-1.0, -1.0]
    nan = attacked_model(Attack("nan"), honest[0], ref, honest)
    assert nan["w"].isnan().all() and nan["steps"].item() == 3
    scaled = attacked_model(Attack("scale", factor=-2.0), honest[0], ref, honest)
    assert scaled["w"].tolist() == [-2.0, -4.0]
    assert honest[0]["w"].tolist() == [1.0, 2.0]  # inputs are never changed


def test_label_flip_maps_each_training_label_to_its_mirror_class() -> None:
    from p2pfl.ml.task import DigitsTask

    data = DigitsTask(n_nodes=4, seed=0).node_data(1, 4)
    flipped = flip_labels(data)
    x, y = data.train_set.tensors
    fx, fy = flipped.train_set.tensors
    assert torch.equal(fx, x) and torch.equal(fy, 9 - y)
    assert flipped.test_set is data.test_set  # evaluation data stays honest
    with pytest.raises(ValueError, match="classification"):
        flip_labels(object())


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"kind": "flood"}, "unknown attack kind"),
        ({"kind": "scale", "start": -1.0}, "start"),
        ({"kind": "label-flip", "start": 5.0}, "no start"),
        ({"kind": "inflation", "lead": 0}, "lead"),
        ({"kind": "ipm", "epsilon": math.inf}, "epsilon"),
    ],
)
def test_bad_attacks_are_refused(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Attack(**kwargs)


def test_a_diverged_numpy_model_is_attacked_without_warnings() -> None:
    import numpy as np

    huge = np.full(3, 3e38, dtype=np.float32)
    honest = [huge, -huge]
    alie = attacked_model(Attack("alie"), huge, np.zeros(3, dtype=np.float32), honest)
    assert alie.shape == (3,)  # overflowed to inf or nan, quietly (warnings are errors here)
