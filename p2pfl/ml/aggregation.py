"""Aggregation primitives over state_dicts, and the check every incoming update passes first.

Guarantees:
- Inputs are never modified; each primitive allocates one output state_dict (O(model)) and
  accumulates into it in place. Median and trimmed mean sort one bounded chunk of one tensor at
  a time, so their scratch memory is a few MB however many states come in.
- Floating tensors are aggregated; other tensors (integer counters such as BatchNorm's
  ``num_batches_tracked``) are copied from the first state.
- :func:`validate_update` returns a short reason slug instead of raising: a remote peer's bad
  update is dropped and counted, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "StateDict",
    "clip_toward",
    "coordinate_median",
    "load_validated",
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


# Every aggregator: (states, weights, reference) -> merged state. The reference is the
# receiver's current model (used by "clip"; the others ignore it).
Aggregator = Callable[[Sequence[StateDict], Sequence[float], StateDict | None], StateDict]


def _mean(
    states: Sequence[StateDict], weights: Sequence[float], reference: StateDict | None
) -> StateDict:
    return weighted_mean(states, weights)


def _median(
    states: Sequence[StateDict], weights: Sequence[float], reference: StateDict | None
) -> StateDict:
    return coordinate_median(states)


def _trimmed(
    states: Sequence[StateDict], weights: Sequence[float], reference: StateDict | None
) -> StateDict:
    return trimmed_mean(states, 0.2)


def _clipped_mean(
    states: Sequence[StateDict], weights: Sequence[float], reference: StateDict | None
) -> StateDict:
    """Clip every update toward the reference to the median update norm, then weighted mean.

    The median norm as threshold needs no tuning and bounds what a minority of outliers can
    move the model by.
    """
    if reference is None:
        raise ValueError("the 'clip' aggregator needs the receiver's current model as reference")
    _check_same_keys([reference, *states])
    norms = [state_norm(s, reference) for s in states]
    threshold = sorted(norms)[(len(norms) - 1) // 2]
    total = math.fsum(weights)
    out: StateDict = {}
    with torch.no_grad():
        for key, ref in reference.items():
            if not ref.is_floating_point():
                out[key] = states[0][key].clone()
                continue
            # Streamed: only one output tensor per key, no clipped copies of the inputs.
            acc = torch.zeros_like(ref)
            for state, w, norm in zip(states, weights, norms, strict=True):
                scale = 1.0 if norm <= threshold else threshold / norm
                acc.add_(torch.lerp(ref, state[key], scale), alpha=w / total)
            out[key] = acc
    return out


AGGREGATORS: dict[str, Aggregator] = {
    "mean": _mean,
    "median": _median,
    "trimmed_mean": _trimmed,
    "clip": _clipped_mean,
}
