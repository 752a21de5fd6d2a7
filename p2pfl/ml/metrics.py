"""Metrics: accuracy/loss for classification; masked MAE, RMSE, WMAPE per horizon for forecasts.

Forecast metrics are in mph, over the readings whose truth is present (NaN truth = missing, left
out), accumulated batch by batch in float64 so the result does not depend on the batch size.
Keys: ``mae_15, rmse_15, wmape_15, mae_30, ... wmape_60`` for horizons of 3, 6, 12 steps of 5 min.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["ClassificationMeter", "ForecastMeter", "horizon_minutes"]


def horizon_minutes(steps: int, step_minutes: int = 5) -> int:
    return steps * step_minutes


class ClassificationMeter:
    """Running accuracy and mean cross-entropy."""

    def __init__(self) -> None:
        self.correct = 0
        self.count = 0
        self.loss_sum = 0.0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.count += int(labels.numel())
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        self.loss_sum += float(loss)

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {"accuracy": math.nan, "loss": math.nan}
        return {"accuracy": self.correct / self.count, "loss": self.loss_sum / self.count}


class ForecastMeter:
    """Masked MAE / RMSE / WMAPE per horizon, in the units of the truth (mph).

    ``update(prediction, truth, own)``: prediction and truth are [batch, horizons, nodes];
    ``own`` is an optional boolean [nodes] mask of the sensors to score (a cloudlet scores only
    its own sensors, not its halo).
    """

    def __init__(self, horizons: Sequence[int], step_minutes: int = 5) -> None:
        self.minutes = [horizon_minutes(h, step_minutes) for h in horizons]
        n = len(self.minutes)
        self.abs_sum = torch.zeros(n, dtype=torch.float64)
        self.sq_sum = torch.zeros(n, dtype=torch.float64)
        self.truth_sum = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)

    def update(
        self, prediction: torch.Tensor, truth: torch.Tensor, own: torch.Tensor | None = None
    ) -> None:
        prediction, truth = prediction.detach().double().cpu(), truth.detach().double().cpu()
        if own is not None:
            own = own.cpu()
            prediction, truth = prediction[:, :, own], truth[:, :, own]
        present = ~torch.isnan(truth)
        err = torch.where(present, prediction - truth, 0.0)
        self.abs_sum += err.abs().sum(dim=(0, 2))
        self.sq_sum += err.square().sum(dim=(0, 2))
        self.truth_sum += torch.where(present, truth, 0.0).abs().sum(dim=(0, 2))
        self.count += present.sum(dim=(0, 2))

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, minutes in enumerate(self.minutes):
            n = float(self.count[i])
            out[f"mae_{minutes}"] = float(self.abs_sum[i]) / n if n else math.nan
            out[f"rmse_{minutes}"] = math.sqrt(float(self.sq_sum[i]) / n) if n else math.nan
            t = float(self.truth_sum[i])
            out[f"wmape_{minutes}"] = float(self.abs_sum[i]) / t if t else math.nan
        total = float(self.count.sum())
        out["loss"] = float(self.abs_sum.sum()) / total if total else math.nan
        return out
