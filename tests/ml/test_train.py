"""fit's report: the loss it reports is the per-sample mean of every step's loss, bit for bit."""

from __future__ import annotations

import torch

from p2pfl.ml import load_task
from p2pfl.ml.train import _weighted_sum


def _per_step(losses: list[torch.Tensor], counts: list[int]) -> float:
    """The former accumulation: ``loss.detach() * n`` added into a float64 tensor each step."""
    total = torch.zeros((), dtype=torch.float64)
    for loss, n in zip(losses, counts, strict=True):
        total += loss.detach() * n
    return float(total)


def test_summing_at_the_end_gives_the_per_step_figure_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    for size in (1, 7, 300):
        losses = list(torch.rand(size, generator=g, dtype=torch.float32) * 10 ** (size % 5))
        counts = torch.randint(1, 4096, (size,), generator=g).tolist()
        assert _weighted_sum(losses, counts) == _per_step(losses, counts)
    assert _weighted_sum([], []) == 0.0


def test_fit_reports_the_mean_of_the_losses_it_stepped_on() -> None:
    task = load_task("digits", n_nodes=1)
    source, loss_fn = task._training(task.central_data(), "cpu")
    seen: list[tuple[torch.Tensor, int]] = []

    def recording(model, batch):  # type: ignore[no-untyped-def]
        loss, n = loss_fn(model, batch)
        seen.append((loss.detach().clone(), n))
        return loss, n

    from p2pfl.ml.train import fit

    report = fit(task.make_model(), source, recording, epochs=1.5, config=task.config)
    losses, counts = [loss for loss, _ in seen], [n for _, n in seen]
    assert report.steps == len(seen) == 68 and report.samples == sum(counts)
    assert report.loss == _per_step(losses, counts) / sum(counts)
