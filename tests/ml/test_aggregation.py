"""Aggregation equals naive references; validation rejects bad updates without side effects."""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.ml.aggregation import (
    AGGREGATORS,
    RULE_PARAMS,
    StateDict,
    StateDictOps,
    aggregate,
    centred_clip,
    clip_toward,
    coordinate_median,
    default_krum_f,
    krum_select,
    load_validated,
    self_centred_clip,
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
    for rule in AGGREGATORS.values():
        rule(states, [1.0] * 4, reference)
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


def _honest_and_attacker(n_honest: int, seed: int = 5) -> tuple[StateDict, list[StateDict]]:
    """A reference model, honest models near it, and the last one negated and scaled by 1e6."""
    g = torch.Generator().manual_seed(seed)
    reference = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    honest = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in reference.items()}
        for _ in range(n_honest)
    ]
    attacker = {k: -1e6 * v for k, v in honest[0].items()}
    return reference, [*honest, attacker]


def test_self_centred_clip_moves_the_result_by_at_most_the_radius_per_attacker() -> None:
    reference, states = _honest_and_attacker(2)
    tau = 0.5
    honest_only = self_centred_clip(reference, [*states[:2], reference], [1.0, 1.0, 1.0], tau)
    attacked = self_centred_clip(reference, states, [1.0, 1.0, 1.0], tau)
    # The attacker replaced a zero difference (the reference itself) by one of norm tau at most.
    assert state_norm(attacked, honest_only) <= tau / 3 + 1e-5
    assert state_norm(attacked, reference) <= tau + 1e-5
    # Within the radius nothing is clipped: the result is the plain weighted mean.
    near = states[:2]
    radius = max(state_norm(s, reference) for s in near)
    for key in reference:
        torch.testing.assert_close(
            self_centred_clip(reference, near, [1.0, 3.0], radius)[key],
            weighted_mean(near, [1.0, 3.0])[key],
        )


def test_centred_clip_iterates_around_its_previous_result() -> None:
    reference, states = _honest_and_attacker(4)
    weights = [1.0] * len(states)
    tau = 0.05
    once = self_centred_clip(reference, states, weights, tau)
    twice = self_centred_clip(once, states, weights, tau)
    out = centred_clip(reference, states, weights, tau, iterations=2)
    for key in reference:
        torch.testing.assert_close(out[key], twice[key])
    assert centred_clip(reference, states, weights, tau, iterations=1).keys() == once.keys()
    # Each step moves the centre by at most tau; three steps end closer to the honest mean
    # than one does, and the attacker (1e6 away) still moves the result by tau / n per step.
    three = centred_clip(reference, states, weights, tau, iterations=3)
    assert state_norm(three, reference) <= 3 * tau + 1e-5
    honest = weighted_mean(states[:4], [1.0] * 4)
    assert state_norm(three, honest) < state_norm(once, honest)
    params = {"clip_radius": tau, "clip_iterations": 3}
    via_rule = aggregate("clip", states, weights, reference, params)
    for key in reference:
        torch.testing.assert_close(via_rule[key], three[key])
    with pytest.raises(ValueError, match="clip_iterations"):
        centred_clip(reference, states, weights, tau, iterations=0)


def test_self_centred_clip_with_the_own_model_only_returns_it() -> None:
    reference, states = _honest_and_attacker(1)
    out = self_centred_clip(reference, [reference, states[-1]], [1.0, 1.0], 0.0)
    for key in reference:
        assert torch.equal(out[key], reference[key])


@pytest.mark.parametrize("rule", ["krum", "multikrum"])
def test_krum_excludes_a_scaled_sign_flipped_model(rule: str) -> None:
    reference, states = _honest_and_attacker(4)
    merged = aggregate(rule, states, [1.0] * 5, reference)
    assert state_norm(merged, reference) < 1.0  # honest models lie within ~0.3 of it
    assert sorted(krum_select(states, 1, 4)) == [0, 1, 2, 3]


def test_multikrum_averages_the_chosen_states_with_their_weights() -> None:
    reference, states = _honest_and_attacker(4)
    chosen = krum_select(states, 1, 4)
    expected = weighted_mean([states[i] for i in chosen], [float(i + 1) for i in chosen])
    merged = aggregate("multikrum", states, [1.0, 2.0, 3.0, 4.0, 5.0], reference, {"krum_f": 1})
    for key in reference:
        torch.testing.assert_close(merged[key], expected[key])


def test_krum_with_three_inputs_still_leaves_the_outlier_out() -> None:
    _, states = _honest_and_attacker(2)
    assert default_krum_f(3) == 1 and default_krum_f(2) == 0 and default_krum_f(9) == 3
    assert sorted(krum_select(states, default_krum_f(3), 2)) == [0, 1]


def test_trimmed_mean_reads_its_fraction_from_params() -> None:
    states = _states(10, seed=3)
    out = aggregate("trimmed_mean", states, [1.0] * 10, None, {"trim_fraction": 0.1})
    for key in ("w", "b"):
        expected = _naive(states, key, lambda v: sum(sorted(v)[1:9]) / 8)
        torch.testing.assert_close(out[key], expected)


@pytest.mark.parametrize("rule", sorted(RULE_PARAMS))
def test_every_rule_refuses_non_finite_inputs(rule: str) -> None:
    reference, states = _honest_and_attacker(3)
    states[1] = {k: v.clone() for k, v in states[1].items()}
    states[1]["b"][0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        aggregate(rule, states, [1.0] * 4, reference)
    states[1]["b"][0] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        AGGREGATORS[rule](states, [1.0] * 4, reference)


def test_unknown_rules_and_parameters_are_refused() -> None:
    reference, states = _honest_and_attacker(2)
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        aggregate("average", states, [1.0] * 3, reference)
    with pytest.raises(ValueError, match="takes no parameter krum_f"):
        aggregate("clip", states, [1.0] * 3, reference, {"krum_f": 1})


def test_state_dict_ops_measures_clips_and_names_its_rules() -> None:
    ops = StateDictOps(max_norm=10.0)
    reference, states = _honest_and_attacker(2)
    assert set(ops.rules) == set(RULE_PARAMS)
    assert ops.distance(reference, states[0]) == pytest.approx(state_norm(states[0], reference))
    assert ops.validate(reference, states[0]) is None
    assert ops.validate(reference, states[-1]) == "norm_exceeded"
    merged = ops.aggregate("clip", reference, states, [1.0] * 3, {"clip_radius": 0.01})
    assert state_norm(merged, reference) <= 0.01 + 1e-6
