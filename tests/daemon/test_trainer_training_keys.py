"""The daemon's trainer applies the setup's training keys as the virtual engine does.

``lr_schedule``/``lr_final``: the factor of each local training is the one the virtual engine
gives a node after as many trainings of the same plan (``max_rounds`` = stop.rounds);
``keep_optimizer``: one Adam state carries over from training to training, in the thread and the
process executor alike, and the weights are those of the learning core's loop run with the same
factors and one kept state.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import trio

from p2pfl.daemon.trainer import NodeTrainer
from p2pfl.learning.ops import TaskWorkload, build_task
from p2pfl.learning.setup import parse_setup
from p2pfl.sim import virtual
from p2pfl.sim.scenario import parse_scenario

ROUNDS = 4
KEYS = {"lr_schedule": "cosine", "lr_final": 0.0, "keep_optimizer": True}


def _task() -> Any:
    return build_task("digits-logreg", n_nodes=3, seed=1)


def _setup(**keys: Any) -> Any:
    return parse_setup({"protocol": "fedavg", "max_rounds": ROUNDS, "epochs": 0.5, **keys})


def _virtual_scales() -> list[float]:
    """The factors the virtual engine gives a node's trainings 0..ROUNDS-1 of the same plan."""
    scenario = parse_scenario(
        {
            "name": "s",
            "task": {"name": "digits-logreg", "nodes": 3},
            "training": dict(KEYS),
            "stop": {"time": 100.0, "rounds": ROUNDS},
            "setup": [{"name": "f", "protocol": "fedavg"}],
        }
    )
    run = virtual._SetupRun(scenario, scenario.setups[0], TaskWorkload(scenario), None)
    return [run.lr_scale(k) for k in range(ROUNDS)]


def _train_all(trainer: NodeTrainer, weights: dict[str, torch.Tensor]) -> list[Any]:
    reports = []

    async def main() -> None:
        nonlocal weights
        for _ in range(ROUNDS):
            weights, _ = await trainer.train(weights, 0.5)
            reports.append((trainer.last_lr_scale, weights, trainer.status()))

    trio.run(main)
    return reports


def test_the_schedule_is_the_virtual_engines() -> None:
    expected = _virtual_scales()
    cosine = [0.5 * (1 + math.cos(math.pi * (k + 0.5) / ROUNDS)) for k in range(ROUNDS)]
    assert expected == pytest.approx(cosine)
    trainer = NodeTrainer(_task(), 0, setup=_setup(**KEYS))
    try:
        done = _train_all(trainer, trainer.initial())
    finally:
        trainer.close()
    assert [scale for scale, _, _ in done] == pytest.approx(expected)
    constant = NodeTrainer(_task(), 0, setup=_setup())
    try:
        assert {scale for scale, _, _ in _train_all(constant, constant.initial())} == {1.0}
    finally:
        constant.close()


def test_a_restarted_trainer_goes_on_with_the_schedule() -> None:
    trainer = NodeTrainer(_task(), 0, setup=_setup(**KEYS), trainings_done=2)
    try:
        assert trainer.lr_scale() == pytest.approx(_virtual_scales()[2])
    finally:
        trainer.close()


@pytest.mark.parametrize("mode", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_kept_adam_state_gives_the_learning_cores_weights(mode: str) -> None:
    """The trainer's weights after each training are the learning core's loop with the same
    factors and one kept Adam state (what the virtual engine runs), not a fresh optimizer's."""
    reference_task = _task()
    data = reference_task.node_data(0, 3)
    model = reference_task.make_model()
    kept: dict[str, Any] = {}
    expected = []
    fresh = []
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = start
    for scale in _virtual_scales():
        model.load_state_dict(weights)
        reference_task.train(model, data, epochs=0.5, lr_scale=scale, optimizer_state=kept)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        expected.append(weights)

    fresh_task = _task()
    weights = start
    for scale in _virtual_scales():
        model.load_state_dict(weights)
        fresh_task.train(model, data, epochs=0.5, lr_scale=scale)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fresh.append(weights)

    trainer = NodeTrainer(_task(), 0, setup=_setup(**KEYS), mode=mode)
    try:
        done = _train_all(trainer, start)
    finally:
        trainer.close()
    for k, (_, got, status) in enumerate(done):
        for name, tensor in got.items():
            assert torch.equal(tensor, expected[k][name]), (k, name)
        steps = (k + 1) * status["last_steps"]  # every training's steps, not the last one's
        assert status["optimizer_steps"] == status["session_steps"] == steps
    assert any(not torch.equal(done[-1][1][n], fresh[-1][n]) for n in fresh[-1])


def test_the_training_count_comes_back_from_the_checkpoint_state() -> None:
    """A restarted daemon's schedule goes on from the trainings its checkpoint records (an
    older checkpoint: its rounds); a damaged entry starts the count at 0, never a crash."""
    from p2pfl.daemon.node import _trainings_done

    assert _trainings_done({"trainings": 5, "round": 3}) == 5
    assert _trainings_done({"round": 3}) == 3
    assert _trainings_done({"trainings": "5", "round": True}) == 0
    assert _trainings_done({"trainings": -1}) == 0
