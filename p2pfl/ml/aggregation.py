"""Aggregation primitives over state_dicts, and the check every incoming update passes first.

Guarantees:
- Inputs are never modified; each primitive allocates one output state_dict (O(model)) and
  accumulates into it in place. Median and trimmed mean sort one bounded chunk of one tensor at
  a time, so their scratch memory is a few MB however many states come in.
- Floating tensors are aggregated; other tensors (integer counters such as BatchNorm's
  ``num_batches_tracked``) are copied from the first state.
- :func:`validate_update` returns a short reason slug instead of raising: a remote peer's bad
  update is dropped and counted, never a crash. :func:`aggregate` refuses (``ValueError``)
  non-finite inputs: NaN/inf never reach a merge, even from a caller that skipped validation.
- Robust rules for few neighbours: self-centred clipping (each input's difference from the
  receiver's own model clipped to a radius) bounds what any one input can move the result by;
  Krum / multi-Krum leave out inputs far from the others; median and trimmed mean per coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "AGGREGATORS",
    "RULE_PARAMS",
    "Aggregator",
    "StateDict",
    "StateDictOps",
    "aggregate",
    "centred_clip",
    "clip_toward",
    "coordinate_median",
    "default_krum_f",
    "krum_select",
    "load_validated",
    "self_centred_clip",
    "state_norm",
    "trimmed_mean",
    "validate_update",
    "weighted_mean",
]

StateDict = dict[str, torch.Tensor]

# Elements per chunk for the sort-based aggregators: bounds the scratch memory to
# n_states * _CHUNK * 4 bytes.
_CHUNK_ELEMENTS = 1 << 20


def _check_same_keys(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if not states:
        raise ValueError("cannot aggregate an empty list of states")
    keys = states[0].keys()
    for i, s in enumerate(states[1:], 1):
        if s.keys() != keys:
            raise ValueError(f"state {i} has different keys than state 0; validate updates first")


def weighted_mean(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_i w_i * state_i / sum_i w_i.

    Two states: one fused ``lerp`` (one pass, like a plain add). More: a scaled copy of the first
    and one in-place multiply-add per other state (n passes where plain adds take n - 1).
    """
    _check_same_keys(states)
    if len(weights) != len(states):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if not math.fsum(weights) > 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    used = [(s, float(w)) for s, w in zip(states, weights, strict=True) if w > 0]
    out: StateDict = {}
    with torch.no_grad():
        for key, first in states[0].items():
            if not first.is_floating_point():
                out[key] = first.clone()
                continue
            if len(used) == 1:
                out[key] = used[0][0][key].clone()
                continue
            if len(used) == 2:  # one fused pass: a + (b - a) * wb / (wa + wb)
                (a, wa), (b, wb) = used
                acc = torch.lerp(a[key], b[key], wb / (wa + wb))
            else:  # n passes: a scaled copy, then one fused multiply-add per input
                total = sum(w for _, w in used)
                acc = torch.mul(used[0][0][key], used[0][1] / total)
                for state, w in used[1:]:
                    acc.add_(state[key], alpha=w / total)
            out[key] = acc
    return out


def _sorted_reduce(
    states: Sequence[StateDict], reduce: Callable[[torch.Tensor], torch.Tensor]
) -> StateDict:
    """Apply ``reduce`` to [n_states, chunk] slices of each floating tensor."""
    _check_same_keys(states)
    n = len(states)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    out: StateDict = {}
    with torch.no_grad():
        for key, first in states[0].items():
            if not first.is_floating_point():
                out[key] = first.clone()
                continue
            flats = [s[key].reshape(-1) for s in states]
            result = torch.empty_like(flats[0])
            for start in range(0, result.numel(), chunk):
                stop = min(start + chunk, result.numel())
                stacked = torch.stack([f[start:stop] for f in flats])
                result[start:stop] = reduce(stacked)
            out[key] = result.reshape(first.shape)
    return out


def coordinate_median(states: Sequence[StateDict]) -> StateDict:
    """Coordinate-wise median; with an even count, the mean of the two middle values."""
    n = len(states)

    def median(stacked: torch.Tensor) -> torch.Tensor:
        ordered = stacked.sort(dim=0).values
        if n % 2:
            return ordered[n // 2]
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2

    return _sorted_reduce(states, median)


def trimmed_mean(states: Sequence[StateDict], trim: float = 0.2) -> StateDict:
    """Coordinate-wise mean after dropping the floor(trim * n) largest and smallest values."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    n = len(states)
    cut = math.floor(trim * n)

    def mean(stacked: torch.Tensor) -> torch.Tensor:
        ordered = stacked.sort(dim=0).values
        return ordered[cut : n - cut].mean(dim=0)

    return _sorted_reduce(states, mean)


def state_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of ``state - reference`` over floating tensors."""
    total = 0.0
    with torch.no_grad():
        for key, value in state.items():
            if value.is_floating_point():
                total += float(torch.sub(value, reference[key]).double().square().sum())
    return math.sqrt(total)


def clip_toward(reference: StateDict, update: StateDict, max_norm: float) -> StateDict:
    """reference + (update - reference) scaled down so its L2 norm is at most ``max_norm``."""
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    norm = state_norm(update, reference)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    out: StateDict = {}
    with torch.no_grad():
        for key, value in update.items():
            if not value.is_floating_point() or scale == 1.0:
                out[key] = value.clone()
            else:
                out[key] = torch.lerp(reference[key], value, scale)
    return out


def validate_update(
    reference: Mapping[str, torch.Tensor],
    update: Mapping[str, object],
    *,
    max_norm: float | None = None,
) -> str | None:
    """None when ``update`` can be merged into ``reference``, else the reason as a slug.

    Reasons: "missing_keys", "unexpected_keys", "not_a_tensor", "shape_mismatch",
    "dtype_mismatch", "not_finite", "norm_exceeded" (L2 distance to the reference above
    ``max_norm``). Reads only; changes nothing.
    """
    if not isinstance(update, Mapping):
        return "not_a_tensor"
    ref_keys, upd_keys = set(reference), set(update)
    if ref_keys - upd_keys:
        return "missing_keys"
    if upd_keys - ref_keys:
        return "unexpected_keys"
    for key, ref in reference.items():
        value = update[key]
        if not isinstance(value, torch.Tensor):
            return "not_a_tensor"
        if value.shape != ref.shape:
            return "shape_mismatch"
        if value.dtype != ref.dtype:
            return "dtype_mismatch"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return "not_finite"
    if max_norm is not None:
        tensors = {k: v for k, v in update.items() if isinstance(v, torch.Tensor)}
        if state_norm(tensors, reference) > max_norm:
            return "norm_exceeded"
    return None


def load_validated(
    model: torch.nn.Module, update: Mapping[str, object], *, max_norm: float | None = None
) -> str | None:
    """Copy ``update`` into ``model`` in place if it validates; return the reason otherwise.

    A rejected update leaves every parameter and buffer of the model untouched.
    """
    reference = model.state_dict()
    reason = validate_update(reference, update, max_norm=max_norm)
    if reason is None:
        with torch.no_grad():
            for key, target in reference.items():
                value = update[key]
                assert isinstance(value, torch.Tensor)
                target.copy_(value)
    return reason


def _check_finite(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    for i, state in enumerate(states):
        for key, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"state {i} has non-finite values in {key!r}; validate updates before merging"
                )


def self_centred_clip(
    reference: StateDict,
    states: Sequence[StateDict],
    weights: Sequence[float],
    radius: float,
) -> StateDict:
    """reference + sum_i w_i * clip(state_i - reference, radius) / sum_i w_i (SCClip).

    Each state's difference from the receiver's own model is scaled down to L2 norm ``radius``
    at most, so a single state among the inputs moves the result by at most
    ``radius * w_i / sum(w)`` however far it lies, and the receiver's own model (distance 0)
    always counts in full. Streamed: one output tensor per key, no clipped copies of the inputs.
    """
    if not radius >= 0 or math.isinf(radius):
        raise ValueError(f"clip radius must be finite and >= 0, got {radius}")
    if len(weights) != len(states):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if not math.fsum(weights) > 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    _check_same_keys([reference, *states])
    norms = [state_norm(s, reference) for s in states]
    total = math.fsum(weights)
    out: StateDict = {}
    with torch.no_grad():
        for key, ref in reference.items():
            if not ref.is_floating_point():
                out[key] = states[0][key].clone()
                continue
            acc = ref.clone()
            for state, w, norm in zip(states, weights, norms, strict=True):
                scale = 1.0 if norm <= radius else radius / norm
                if w > 0 and scale > 0:
                    acc.add_(torch.sub(state[key], ref), alpha=w / total * scale)
            out[key] = acc
    return out


def centred_clip(
    reference: StateDict,
    states: Sequence[StateDict],
    weights: Sequence[float],
    radius: float,
    iterations: int = 1,
) -> StateDict:
    """Centred clipping (Karimireddy et al., 2021): ``v <- v + sum_i w_i clip(x_i - v, radius) /
    sum_i w_i`` ``iterations`` times from ``v = reference``; one iteration is
    :func:`self_centred_clip`. Each step moves ``v`` by at most ``radius``."""
    if iterations < 1:
        raise ValueError(f"clip_iterations must be at least 1, got {iterations}")
    centre = reference
    for _ in range(iterations):
        centre = self_centred_clip(centre, states, weights, radius)
    return centre


def default_krum_f(n: int) -> int:
    """The number of Byzantine inputs Krum assumes when none is configured: the most that
    n >= 2f + 3 allows, and at least 1 once there are three inputs to choose from."""
    return 0 if n < 3 else max(1, (n - 3) // 2)


def krum_select(states: Sequence[StateDict], f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` states with the lowest Krum scores (Blanchard et al., 2017).

    A state's score is the sum of squared L2 distances to its ``n - f - 2`` nearest other
    states (at least 1), so a state far from every other one scores high and is left out.
    Ties go to the lower index.
    """
    n = len(states)
    if not 0 <= f < n:
        raise ValueError(f"krum_f must be in 0..{n - 1} for {n} states, got {f}")
    if not 1 <= m <= n:
        raise ValueError(f"krum_m must be in 1..{n} for {n} states, got {m}")
    if n == 1:
        return [0]
    _check_same_keys(states)
    squared = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            squared[i][j] = squared[j][i] = state_norm(states[i], states[j]) ** 2
    nearest = max(1, n - f - 2)
    scores = [math.fsum(sorted(squared[i][:i] + squared[i][i + 1 :])[:nearest]) for i in range(n)]
    return sorted(range(n), key=lambda i: (scores[i], i))[:m]


RULE_PARAMS: dict[str, frozenset[str]] = {
    "mean": frozenset(),
    "median": frozenset(),
    "trimmed_mean": frozenset({"trim_fraction"}),
    "clip": frozenset({"clip_radius", "clip_iterations"}),
    "krum": frozenset({"krum_f"}),
    "multikrum": frozenset({"krum_f", "krum_m"}),
}
"""Every rule and the parameters it reads (unset parameters take the defaults below)."""


def aggregate(
    rule: str,
    states: Sequence[StateDict],
    weights: Sequence[float],
    reference: StateDict | None,
    params: Mapping[str, float] | None = None,
) -> StateDict:
    """Combine ``states`` by ``rule`` with its ``params``; refuses non-finite inputs.

    - "mean": weighted mean.  "median": coordinate median.
    - "trimmed_mean": coordinate mean without the floor(trim_fraction * n) largest and smallest
      values (trim_fraction, default 0.2).
    - "clip": self-centred clipping around ``reference`` (the receiver's own model) to
      ``clip_radius``; without a radius, the median distance of the inputs (stateless).
      ``clip_iterations`` > 1 repeats it around the previous result (centred clipping, CClip).
    - "krum": the one state with the lowest Krum score; "multikrum": the weighted mean of the
      ``krum_m`` lowest (default n - krum_f). krum_f defaults to :func:`default_krum_f`.
    """
    if rule not in RULE_PARAMS:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULE_PARAMS)}")
    params = params or {}
    unknown = set(params) - RULE_PARAMS[rule]
    if unknown:
        raise ValueError(f"rule {rule!r} takes no parameter {', '.join(sorted(unknown))}")
    _check_finite(states)
    if rule == "mean":
        return weighted_mean(states, weights)
    if rule == "median":
        return coordinate_median(states)
    if rule == "trimmed_mean":
        return trimmed_mean(states, float(params.get("trim_fraction", 0.2)))
    if rule == "clip":
        if reference is None:
            raise ValueError("the 'clip' rule needs the receiver's current model as reference")
        _check_finite([reference])
        radius = params.get("clip_radius")
        if radius is None:
            norms = sorted(state_norm(s, reference) for s in states)
            radius = norms[(len(norms) - 1) // 2]
        return centred_clip(
            reference, states, weights, float(radius), int(params.get("clip_iterations", 1))
        )
    n = len(states)
    f = int(params.get("krum_f", default_krum_f(n)))
    f = min(f, n - 1)
    m = 1 if rule == "krum" else int(params.get("krum_m", n - f))
    chosen = krum_select(states, f, max(1, min(m, n)))
    kept = [float(weights[i]) for i in chosen]
    if not math.fsum(kept) > 0:
        kept = [1.0] * len(chosen)
    return weighted_mean([states[i] for i in chosen], kept)


# Every aggregator: (states, weights, reference) -> merged state with the rule's default
# parameters. The reference is the receiver's current model (used by "clip").
Aggregator = Callable[[Sequence[StateDict], Sequence[float], StateDict | None], StateDict]


def _rule(name: str) -> Aggregator:
    def run(
        states: Sequence[StateDict], weights: Sequence[float], reference: StateDict | None
    ) -> StateDict:
        return aggregate(name, states, weights, reference)

    run.__name__ = f"aggregate_{name}"
    return run


AGGREGATORS: dict[str, Aggregator] = {name: _rule(name) for name in RULE_PARAMS}


class StateDictOps:
    """``ModelOps`` (``p2pfl.protocols``) over torch state_dicts, by the rules above.

    ``max_norm`` bounds the L2 distance of an update from the receiver's model at validation
    (None: no bound); the machines' self-centred clipping bounds its effect in any case.
    """

    def __init__(self, *, max_norm: float | None = None) -> None:
        self.max_norm = max_norm

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(RULE_PARAMS)

    def validate(self, reference: StateDict, update: StateDict) -> str | None:
        return validate_update(reference, update, max_norm=self.max_norm)

    def distance(self, reference: StateDict, update: StateDict) -> float:
        return state_norm(update, reference)

    def aggregate(
        self,
        rule: str,
        reference: StateDict,
        models: Sequence[StateDict],
        weights: Sequence[float],
        params: Mapping[str, float] | None = None,
    ) -> StateDict:
        return aggregate(rule, models, weights, reference, params)
