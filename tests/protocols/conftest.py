"""Shared helpers: a real ModelOps over plain floats, and a training report."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Report:
    samples: int
    loss: float = 0.5


class FloatOps:
    """Models are floats: the aggregation rules in one dimension, validation by finiteness and
    distance. ``calls`` records each aggregate call's rule and params."""

    def __init__(self, max_distance: float = 100.0) -> None:
        self.max_distance = max_distance
        self.calls: list[tuple[str, dict[str, float]]] = []

    @property
    def rules(self) -> Collection[str]:
        return ("mean", "median", "clip", "krum", "multikrum", "trimmed_mean")

    def validate(self, reference: float, update: float) -> str | None:
        if not math.isfinite(update):
            return "not_finite"
        if abs(update - reference) > self.max_distance:
            return "norm"
        return None

    def distance(self, reference: float, update: float) -> float:
        return abs(update - reference)

    def aggregate(
        self,
        rule: str,
        reference: float,
        models: Sequence[float],
        weights: Sequence[float],
        params: Mapping[str, float] | None = None,
    ) -> float:
        self.calls.append((rule, dict(params or {})))
        if rule == "median":
            ordered = sorted(models)
            return ordered[len(ordered) // 2]
        if rule == "clip":
            radius = (params or {})["clip_radius"]
            centre = reference
            for _ in range(int((params or {}).get("clip_iterations", 1))):
                moved = [max(-radius, min(radius, m - centre)) for m in models]
                centre += sum(d * w for d, w in zip(moved, weights, strict=True)) / sum(weights)
            return centre
        if rule in ("krum", "multikrum"):
            n = len(models)
            f = int((params or {}).get("krum_f", 1 if n >= 3 else 0))
            near = max(1, n - f - 2)
            scores = [
                sum(sorted((m - o) ** 2 for j, o in enumerate(models) if j != i)[:near])
                for i, m in enumerate(models)
            ]
            keep = 1 if rule == "krum" else int((params or {}).get("krum_m", n - f))
            chosen = sorted(range(n), key=lambda i: (scores[i], i))[:keep]
            models = [models[i] for i in chosen]
            weights = [weights[i] for i in chosen]
        return sum(m * w for m, w in zip(models, weights, strict=True)) / sum(weights)


class LegacyOps:
    """An ops object from before rule parameters: no distance(), aggregate without params."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def rules(self) -> Collection[str]:
        return ("mean", "clip")

    def validate(self, reference: float, update: float) -> str | None:
        return None if math.isfinite(update) else "not_finite"

    def aggregate(
        self, rule: str, reference: float, models: Sequence[float], weights: Sequence[float]
    ) -> float:
        self.calls.append(rule)
        return sum(m * w for m, w in zip(models, weights, strict=True)) / sum(weights)


@pytest.fixture
def ops() -> FloatOps:
    return FloatOps()


@pytest.fixture
def report() -> type[Report]:
    """``report(samples)`` builds a training report."""
    return Report
