"""p2pfl's CPU Adam takes exactly torch.optim.Adam's steps, and training never imports dynamo."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

import p2pfl.ml.train as train_module
from p2pfl.ml import MLP, TrainConfig, load_task
from p2pfl.ml.adam import Adam


def _steps(model: nn.Module, optimizer: Any, steps: int, seed: int, lr: float) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for group in optimizer.param_groups:
        group["lr"] = lr
    for _ in range(steps):
        x = torch.randn(16, 64, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(loss.item())
    return losses


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["state"].keys() != b["state"].keys():
        return False
    return all(
        torch.equal(a["state"][i][k], b["state"][i][k])
        for i in a["state"]
        for k in ("step", "exp_avg", "exp_avg_sq")
    )


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_steps_are_bit_identical_to_torch_adam(weight_decay: float) -> None:
    torch.manual_seed(3)
    ours_model = MLP()
    torch_model = MLP()
    torch_model.load_state_dict(ours_model.state_dict())
    ours = Adam(ours_model.parameters(), lr=3e-3, weight_decay=weight_decay)
    theirs = torch.optim.Adam(torch_model.parameters(), lr=3e-3, weight_decay=weight_decay)
    # Two phases with a learning-rate change, as a schedule does between calls of fit().
    for lr in (3e-3, 7e-4):
        assert _steps(ours_model, ours, 25, 1, lr) == _steps(torch_model, theirs, 25, 1, lr)
        assert _same(ours_model, torch_model)
        assert _same_state(ours.state_dict(), theirs.state_dict())


def test_state_dicts_load_across_the_two_implementations() -> None:
    torch.manual_seed(4)
    start = MLP()
    model = MLP()
    model.load_state_dict(start.state_dict())
    theirs = torch.optim.Adam(model.parameters(), lr=1e-3)
    _steps(model, theirs, 5, 2, 1e-3)
    # Continue once with ours from torch's state, once with torch's from ours: same path.
    a, b = MLP(), MLP()
    a.load_state_dict(model.state_dict())
    b.load_state_dict(model.state_dict())
    # Both optimizers, like torch's, use the loaded tensors in place: give each its own copy.
    ours = Adam(a.parameters())
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    reference = torch.optim.Adam(b.parameters(), lr=1e-3)
    reference.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _steps(a, ours, 5, 9, 1e-3)
    _steps(b, reference, 5, 9, 1e-3)
    assert _same(a, b)
    back = torch.optim.Adam(MLP().parameters(), lr=1e-3)
    back.load_state_dict(ours.state_dict())
    assert _same_state(back.state_dict(), ours.state_dict())


def test_state_for_another_model_is_refused() -> None:
    ours = Adam(MLP().parameters())
    with pytest.raises(ValueError, match="for 2 parameters, the model has 6"):
        ours.load_state_dict(Adam(nn.Linear(3, 2).parameters()).state_dict())


def test_fit_trains_as_it_did_with_torch_adam(monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> tuple[nn.Module, float, dict[str, Any]]:
        # A fresh task each time: a task shuffles differently on each call of train().
        task = load_task("digits", n_nodes=3, partition="dirichlet", seed=5)
        data = task.node_data(2, 3)
        model, state = task.make_model(), {}
        report = task.train(model, data, epochs=1.5, optimizer_state=state)
        report = task.train(model, data, epochs=1.0, optimizer_state=state, lr_scale=0.5)
        return model, report.loss, state

    ours = run()

    def torch_adam(model: nn.Module, config: TrainConfig, device: torch.device) -> Any:
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    monkeypatch.setattr(train_module, "_adam", torch_adam)
    theirs = run()
    assert _same(ours[0], theirs[0])
    assert ours[1] == theirs[1]
    assert _same_state(ours[2], theirs[2])
    task = load_task("digits", n_nodes=3, partition="dirichlet", seed=5)
    assert task.evaluate(ours[0]) == task.evaluate(theirs[0])


def test_a_training_step_in_a_fresh_process_does_not_import_dynamo() -> None:
    code = (
        "import sys; from p2pfl.ml import load_task;"
        "t = load_task('digits', n_nodes=2); state = {};"
        "m = t.make_model(); t.train(m, t.node_data(0, 2), epochs=1e-9, optimizer_state=state);"
        "t.train(m, t.node_data(0, 2), epochs=1e-9, optimizer_state=state); t.evaluate(m);"
        "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
