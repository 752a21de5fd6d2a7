"""``p2pfl train``: the centralized baseline, one model trained on all of a task's data.

Writes ``metrics.json`` into ``--out`` (the baseline row of every comparison) and prints a
table. torch is imported only when the command runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

_TASKS = ("digits", "digits-logreg", "traffic-metr-la", "traffic-pems-bay")
_DEFAULT_EPOCHS = {"digits": 20.0, "digits-logreg": 20.0}  # traffic: 3 (CPU-bound STGCN)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@click.command("train")
@click.option("--task", "task_name", type=click.Choice(_TASKS), default="digits", show_default=True)
@click.option("--epochs", type=float, help="Passes over the data [digits: 20, traffic: 3].")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/train"),
    show_default=True,
    help="Folder for metrics.json.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--days", type=int, default=28, show_default=True, help="Traffic: synthetic days.")
@click.option(
    "--readings",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Traffic: real speeds (CSV/NPZ/HDF5, time x sensors) instead of synthetic ones.",
)
@click.option("--threads", type=int, default=None, help="torch threads [all cores].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def train(
    task_name: str,
    epochs: float | None,
    out: Path,
    seed: int,
    days: int,
    readings: Path | None,
    threads: int | None,
    device: str,
) -> None:
    """Train one model on all data of a task (the centralized baseline)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from p2pfl.cli._errors import EXIT_DATA, fail
    from p2pfl.ml import load_task
    from p2pfl.ml.forecast import TrafficTask, baseline_metrics
    from p2pfl.ml.models import parameter_count
    from p2pfl.ml.readings import ReadingsError

    console = Console()
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: torch sees no CUDA device; use --device cpu")
    traffic = task_name.startswith("traffic-")
    epochs = epochs if epochs is not None else _DEFAULT_EPOCHS.get(task_name, 3.0)
    options: dict[str, Any] = {"days": days, "readings": readings} if traffic else {}
    started = time.perf_counter()
    try:
        task = load_task(task_name, n_nodes=7 if traffic else 1, seed=seed, **options)
    except ReadingsError as exc:
        raise fail(str(exc), EXIT_DATA) from None
    data = task.central_data()
    model = task.make_model()
    console.print(
        f"[bold]{task_name}[/]: {parameter_count(model):,} parameters, "
        f"{data.num_samples:,} training samples, {epochs:g} epochs on {device}"
    )
    report = task.train(model, data, epochs=epochs, device=device)
    metrics = task.evaluate(model, device=device)
    baselines = baseline_metrics(task) if isinstance(task, TrafficTask) else {}

    payload: dict[str, Any] = {
        "task": task_name,
        "seed": seed,
        "epochs": epochs,
        "device": device,
        "parameters": parameter_count(model),
        "train": asdict(report),
        "metrics": metrics,
        "baselines": baselines,
        "total_s": time.perf_counter() - started,
    }
    if isinstance(task, TrafficTask):
        payload["data"] = {"days": days, "readings": str(readings) if readings else "synthetic"}
        payload["left_out_sensors"] = task.partition.left_out
        payload["halo"] = task.halo_report()
    _write_json(out / "metrics.json", payload)

    table = Table(title=f"{task_name}: centralized baseline (test split)")
    table.add_column("metric")
    table.add_column("model", justify="right")
    for name in baselines:
        table.add_column(name.replace("_", " "), justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}", *(f"{b[key]:.4f}" for b in baselines.values()))
    console.print(table)
    energy = "n/a" if report.energy_j is None else f"{report.energy_j:.1f} J"
    console.print(
        f"trained {report.samples:,} samples in {report.wall_s:.1f} s "
        f"({report.samples_per_s:,.0f}/s), energy {energy}; wrote {out / 'metrics.json'}"
    )
