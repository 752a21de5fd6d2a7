"""Aggregation equals naive references; validation rejects bad updates without side effects."""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.ml.aggregation import (
    AGGREGATORS,
    StateDict,
    clip_toward,
    coordinate_median,
    load_validated,
    state_norm,
    trimmed_mean,
    validate_update,
    weighted_mean,
)
from p2pfl.ml.models import MLP


def _states(n: int, seed: int = 0) -> list[StateDict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(3, 4, generator=g),
            "b": torch.randn(4, generator=g),
            "count": torch.tensor(7 + i),
        }
        for i in range(n)
    ]


def _naive(states: list[StateDict], key: str, fn) -> torch.Tensor:
    flat = [s[key].reshape(-1).tolist() for s in states]
    return torch.tensor([fn([f[j] for f in flat]) for j in range(len(flat[0]))]).reshape(
        states[0][key].shape
    )


def test_weighted_mean_equals_the_naive_weighted_sum() -> None:
    states, weights = _states(3), [1.0, 2.0, 5.0]
    out = weighted_mean(states, weights)
    for key in ("w", "b"):
        expected = _naive(
            states, key, lambda v: sum(x * w for x, w in zip(v, weights, strict=True)) / 8.0
        )
        torch.testing.assert_close(out[key], expected)
    assert out["count"] == 7  # integer tensors come from the first state


@pytest.mark.parametrize("n", [3, 4])
def test_coordinate_median_equals_the_naive_median(n: int) -> None:
    states = _states(n, seed=n)

    def median(v: list[float]) -> float:
        v = sorted(v)
        return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2

    out = coordinate_median(states)
    for key in ("w", "b"):
        torch.testing.assert_close(out[key], _naive(states, key, median))


def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    states = _states(10, seed=3)
    out = trimmed_mean(states, 0.2)
    for key in ("w", "b"):
        expected = _naive(states, key, lambda v: sum(sorted(v)[2:8]) / 6)
        torch.testing.assert_close(out[key], expected)


def test_aggregators_do_not_modify_their_inputs() -> None:
    states = _states(4)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    reference = {k: v.clone() for k, v in states[0].items()}
    for aggregate in AGGREGATORS.values():
        aggregate(states, [1.0] * 4, reference)
    for s, b in zip(states, before, strict=True):
        for key in s:
            assert torch.equal(s[key], b[key])


def test_clip_toward_limits_the_distance_to_the_reference() -> None:
    reference = {"w": torch.zeros(4)}
    update = {"w": torch.tensor([3.0, 4.0, 0.0, 0.0])}  # norm 5
    clipped = clip_toward(reference, update, 1.0)
    torch.testing.assert_close(clipped["w"], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert clip_toward(reference, update, 10.0)["w"].equal(update["w"])


def test_clip_aggregator_bounds_an_outlier_by_the_median_norm() -> None:
    reference = {"w": torch.zeros(2)}
    honest = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    outlier = {"w": torch.tensor([1000.0, 0.0])}
    merged = AGGREGATORS["clip"]([*honest, outlier], [1.0, 1.0, 1.0], reference)
    assert state_norm(merged, reference) <= 1.0 + 1e-6


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s.pop("b"), "missing_keys"),
        (lambda s: s.update(extra=torch.zeros(1)), "unexpected_keys"),
        (lambda s: s.update(b=torch.zeros(5)), "shape_mismatch"),
        (lambda s: s.update(b=torch.zeros(4, dtype=torch.float64)), "dtype_mismatch"),
        (lambda s: s["w"].__setitem__((0, 0), math.nan), "not_finite"),
        (lambda s: s["w"].__setitem__((0, 0), math.inf), "not_finite"),
        (lambda s: s.update(b=[0.0] * 4), "not_a_tensor"),
    ],
)
def test_validate_update_names_the_reason(change, reason: str) -> None:
    reference = _states(1)[0]
    update = {k: v.clone() for k, v in reference.items()}
    assert validate_update(reference, update) is None
    change(update)
    assert validate_update(reference, update) == reason


def test_validate_update_enforces_the_norm_bound() -> None:
    reference = {"w": torch.zeros(4)}
    assert validate_update(reference, {"w": torch.full((4,), 1.0)}, max_norm=2.0) is None
    assert validate_update(reference, {"w": torch.full((4,), 1.5)}, max_norm=2.0) == "norm_exceeded"


def test_a_rejected_update_leaves_the_model_unchanged() -> None:
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = {k: v.clone() + 1 for k, v in before.items()}
    poisoned["net.4.bias"][3] = math.nan  # the last key: every earlier key would copy fine
    assert load_validated(model, poisoned) == "not_finite"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    good = {k: v + 1 for k, v in before.items()}
    assert load_validated(model, good) is None
    assert torch.equal(model.state_dict()["net.0.weight"], good["net.0.weight"])
