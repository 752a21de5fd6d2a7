"""Shared helpers: a real ModelOps over plain floats, and a training report."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Report:
    samples: int
    loss: float = 0.5


class FloatOps:
    """Models are floats: weighted mean / median, validation by finiteness and distance."""

    def __init__(self, max_distance: float = 100.0) -> None:
        self.max_distance = max_distance

    @property
    def rules(self) -> Collection[str]:
        return ("mean", "median")

    def validate(self, reference: float, update: float) -> str | None:
        if not math.isfinite(update):
            return "not_finite"
        if abs(update - reference) > self.max_distance:
            return "norm"
        return None

    def aggregate(
        self, rule: str, reference: float, models: Sequence[float], weights: Sequence[float]
    ) -> float:
        if rule == "median":
            ordered = sorted(models)
            return ordered[len(ordered) // 2]
        return sum(m * w for m, w in zip(models, weights, strict=True)) / sum(weights)


@pytest.fixture
def ops() -> FloatOps:
    return FloatOps()


@pytest.fixture
def report() -> type[Report]:
    """``report(samples)`` builds a training report."""
    return Report
