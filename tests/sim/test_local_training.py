"""Local training across rounds: the optimizer state a node keeps, and the learning-rate schedule.

Full-batch training makes the batches of every call the same, so training twice for k steps
with the kept optimizer state must equal training once for 2k steps (the torch loop and the
numpy path alike), and training twice with fresh optimizers must not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pfl.learning.ops import TaskWorkload
from p2pfl.sim import virtual
from p2pfl.sim.scenario import Scenario, ScenarioError, TrainingSpec, parse_scenario
from p2pfl.sim.vectorized import VectorizedLogReg

Tiny = Callable[..., Scenario]
FULL_BATCH = {"batch_size": 4096, "lr": 0.05}


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    return bool(np.allclose(a, b, atol=1e-6))


@pytest.mark.parametrize("path", ["task", "vectorized"])
def test_kept_optimizer_state_makes_two_trainings_one(tiny: Tiny, path: str) -> None:
    scenario = tiny(task=FULL_BATCH, training={"path": path})
    workload = TaskWorkload(scenario) if path == "task" else VectorizedLogReg(scenario)
    start = workload.initial()
    once, _ = workload.train(0, start, 6.0)  # one batch per epoch: 6 steps

    state: dict[str, Any] = {}
    half, _ = workload.train(0, start, 3.0, optimizer_state=state)
    assert state  # the moments are kept ...
    kept, _ = workload.train(0, half, 3.0, optimizer_state=state)
    fresh, _ = workload.train(0, half, 3.0)  # ... and a fresh Adam restarts its bias correction
    assert _close(kept, once)
    assert not _close(fresh, once)


@pytest.mark.parametrize("path", ["task", "vectorized"])
def test_lr_scale_zero_leaves_the_weights_alone(tiny: Tiny, path: str) -> None:
    scenario = tiny(task=FULL_BATCH, training={"path": path})
    workload = TaskWorkload(scenario) if path == "task" else VectorizedLogReg(scenario)
    start = workload.initial()
    still, _ = workload.train(0, start, 2.0, lr_scale=0.0)
    moved, _ = workload.train(0, start, 2.0, lr_scale=0.5)
    assert _close(still, start)
    assert not _close(moved, start)


def test_cosine_schedule_runs_from_lr_to_lr_final() -> None:
    spec = TrainingSpec(lr_schedule="cosine", lr_final=0.1)
    assert spec.lr_scale(0.0) == 1.0
    assert spec.lr_scale(1.0) == pytest.approx(0.1)
    assert spec.lr_scale(0.5) == pytest.approx(0.55)
    assert spec.lr_scale(2.0) == pytest.approx(0.1)  # past the plan: stays at the floor
    assert TrainingSpec().lr_scale(0.7) == 1.0


def test_schedule_keys_are_checked(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["training"]["lr_schedule"] = "linear"
    with pytest.raises(ScenarioError, match=r"training\.lr_schedule: must be one of"):
        parse_scenario(tiny_dict, "exp.toml")
    tiny_dict["training"].update(lr_schedule="cosine", lr_final=1.5)
    with pytest.raises(ScenarioError, match=r"training\.lr_final: must be in"):
        parse_scenario(tiny_dict, "exp.toml")
    tiny_dict["training"].update(lr_schedule="constant", lr_final=0.2)
    with pytest.raises(ScenarioError, match=r"training\.lr_final: applies only with lr_sch"):
        parse_scenario(tiny_dict, "exp.toml")
    tiny_dict["training"].update(lr_schedule="cosine", lr_final=0.2, keep_optimizer="yes")
    with pytest.raises(ScenarioError, match=r"training\.keep_optimizer: must be bool"):
        parse_scenario(tiny_dict, "exp.toml")


def test_engine_passes_each_node_its_state_and_its_schedule_step(tiny: Tiny) -> None:
    scenario = tiny(
        training={"keep_optimizer": True, "lr_schedule": "cosine", "lr_final": 0.0},
        stop={"time": 1000.0, "rounds": 4},
    )
    calls: list[tuple[int | None, float, int]] = []
    inner = TaskWorkload(scenario)
    states: dict[int | None, list[dict[str, Any]]] = {}

    class Recording:
        primary_metric, higher_is_better, ops = (
            inner.primary_metric,
            inner.higher_is_better,
            inner.ops,
        )

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def train(self, node: int | None, weights: Any, epochs: float, **kw: Any) -> Any:
            state = kw["optimizer_state"]
            held = states.setdefault(node, [])
            if not any(state is other for other in held):
                held.append(state)
            calls.append((node, kw["lr_scale"], len(state)))
            return inner.train(node, weights, epochs, **kw)

    results = virtual.run(scenario, workload=Recording())  # type: ignore[arg-type]
    assert all(s.final["accuracy"] > 0.5 for s in results.setups)
    per_node: dict[int | None, list[float]] = {}
    for node, scale, _ in calls:
        per_node.setdefault(node, []).append(scale)
    cosine = [0.5 * (1 + math.cos(math.pi * (k + 0.5) / 4)) for k in range(4)]
    for node, scales in per_node.items():
        # gossip, server-free and FedAvg each give a node 4 trainings, in schedule order
        assert scales == pytest.approx(cosine * (len(scales) // 4)), node
    # one kept state per node and setup, reused from its second training on
    assert all(len(held) == len(scenario.setups) for held in states.values())
    assert any(n_keys > 0 for _, _, n_keys in calls)


def test_the_processes_engine_refuses_a_schedule_without_planned_rounds(
    tmp_path: Path, tiny: Callable[..., Scenario]
) -> None:
    """The daemons apply both keys (tests/daemon/test_setup_keys_processes.py); a schedule over
    stop.time (no stop.rounds) is the one thing they cannot plan as the virtual engine does."""
    from p2pfl.sim import processes

    both = {"lr_schedule": "cosine", "keep_optimizer": True}
    processes.refuse_unapplied_training(tiny(training=both, stop={"time": 5.0, "rounds": 2}))
    processes.refuse_unapplied_training(tiny(training={"keep_optimizer": True}))
    from click.testing import CliRunner

    from p2pfl.cli import main

    text = (
        'name = "p"\n[task]\nname = "digits-logreg"\nnodes = 2\n[training]\n'
        'lr_schedule = "cosine"\n[stop]\ntime = 5.0\n[[setup]]\nname = "g"\nprotocol = "gossip"\n'
    )
    scenario = tmp_path / "p.toml"
    scenario.write_text(text)
    result = CliRunner().invoke(
        main, ["simulate", str(scenario), "--engine", "processes", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]  # after the engine's legend
    assert last.startswith(
        f"p2pfl: {scenario}:6: training.lr_schedule: setup 'g' has no stop.rounds"
    ), last
    assert "Traceback" not in result.output


def test_the_processes_engines_baseline_applies_the_schedule_and_kept_optimizer(
    tiny: Callable[..., Scenario], monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pfl.sim import processes

    scenario = tiny(
        training={"lr_schedule": "cosine", "keep_optimizer": True},
        setup=[{"name": "c", "protocol": "centralized", "stop": {"time": 1e6, "rounds": 3}}],
    )
    processes.refuse_unapplied_training(scenario)  # the baseline alone: nothing refused
    calls: list[tuple[float, int]] = []
    original = TaskWorkload.train

    def recording(self: Any, node: Any, weights: Any, epochs: float, **kw: Any) -> Any:
        calls.append((kw["lr_scale"], len(kw["optimizer_state"])))
        return original(self, node, weights, epochs, **kw)

    monkeypatch.setattr(TaskWorkload, "train", recording)  # the real training, recorded
    processes._run_centralized(scenario, scenario.setups[0], None)
    scales = [scale for scale, _ in calls]
    assert len(calls) == 3 and scales == sorted(scales, reverse=True) and scales[0] < 1.0
    assert [held for _, held in calls][1:] != [0, 0]  # the optimizer state carried over
