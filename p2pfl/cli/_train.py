"""``p2pfl train``: the centralized baseline, one model trained on all of a task's data.

Writes ``metrics.json`` into ``--out`` (the baseline row of every comparison) and prints a
table. torch is imported only when the command runs.

Where results go: without ``--out``, a new folder ``<task>-<UTC time>`` under the user's data
directory (``$XDG_DATA_HOME/p2pfl/train``, by default ``~/.local/share/p2pfl/train``), so a run
never writes into the working tree it was started from (a clone of this repository, say) and
never replaces an earlier run; the last line names the folder. An explicit ``--out`` that
already holds a ``metrics.json`` is refused before any training, never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

_TASKS = ("digits", "digits-logreg", "traffic-metr-la", "traffic-pems-bay")
_DEFAULT_EPOCHS = {"digits": 20.0, "digits-logreg": 20.0}  # traffic: 3 (CPU-bound STGCN)


def default_runs_dir() -> Path:
    """``$XDG_DATA_HOME/p2pfl/train``, or ``~/.local/share/p2pfl/train``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "p2pfl" / "train"


def new_run_dir(parent: Path, task_name: str, now: float) -> Path:
    """Create and return a new, empty ``<task>-<UTC time>`` folder under ``parent`` (``-2``,
    ``-3``... when runs start within the same second): an earlier run is never touched."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = parent / (f"{task_name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: no free folder name for {task_name}-{stamp}")


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that holds an earlier run (before spending minutes training)."""
    from p2pfl.cli._errors import EXIT_USAGE, fail

    try:  # now, not after the training: somewhere to write its metrics
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"--out {out}: {exc.strerror}; choose another folder", EXIT_USAGE) from None
    if (out / "metrics.json").exists():
        raise fail(
            f"--out {out} already holds metrics.json from an earlier run; give a new folder, "
            "remove that one, or leave out --out for a new timestamped folder",
            EXIT_USAGE,
        )


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
@click.option(
    "--epochs",
    type=click.FloatRange(min=0, min_open=True, max=1e6),
    help="Passes over the data [digits: 20, traffic: 3].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for metrics.json; one with an earlier run's is refused. "
    "[default: a new <task>-<time> folder in $XDG_DATA_HOME/p2pfl/train]",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=28,
    show_default=True,
    help="Traffic: synthetic days.",
)
@click.option(
    "--readings",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Traffic: real speeds (CSV/NPZ/HDF5, time x sensors) instead of synthetic ones.",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch threads [all cores]."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def train(
    task_name: str,
    epochs: float | None,
    out: Path | None,
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
    from p2pfl.ml.executor import device_problem
    from p2pfl.ml.forecast import TrafficTask, baseline_metrics
    from p2pfl.ml.models import parameter_count
    from p2pfl.ml.readings import ReadingsError

    if epochs is not None and not math.isfinite(epochs):
        raise click.BadParameter(f"{epochs} is not a number of passes", param_hint="--epochs")
    if out is not None:
        _check_out(out)
    console = Console()
    if threads:
        torch.set_num_threads(threads)
    if (problem := device_problem(device)) is not None:
        raise click.UsageError(f"--device {device}: {problem}")
    traffic = task_name.startswith("traffic-")
    epochs = epochs if epochs is not None else _DEFAULT_EPOCHS.get(task_name, 3.0)
    options: dict[str, Any] = {"days": days, "readings": readings} if traffic else {}
    if traffic and readings is None:
        console.print(
            f"[yellow]synthetic readings[/]: {days} days of generated sensor speeds on the real "
            "sensor graph, not measured ones (--readings FILE for real data)"
        )
    started = time.perf_counter()
    try:
        with console.status(f"preparing {task_name}: data and model"):
            task = load_task(task_name, n_nodes=7 if traffic else 1, seed=seed, **options)
            data = task.central_data()
            model = task.make_model()
    except ReadingsError as exc:
        raise fail(str(exc), EXIT_DATA) from None
    console.print(
        f"[bold]{task_name}[/]: {parameter_count(model):,} parameters, "
        f"{data.num_samples:,} training samples, {epochs:g} epochs on {device}"
    )
    train_set = getattr(data, "train_set", None)
    steps = (
        max(1, math.ceil(epochs * train_set.batches_per_epoch(task.config.batch_size)))
        if train_set is not None
        else None
    )
    with _progress(console) as progress:
        bar = progress.add_task("training", total=steps)

        def step() -> bool:  # polled once before every step
            progress.advance(bar)
            return False

        report = task.train(model, data, epochs=epochs, device=device, should_stop=step)
        progress.update(bar, completed=steps)
    with console.status("scoring the model on the test split"):
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
    if out is None:
        out = new_run_dir(default_runs_dir(), task_name, time.time())
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
        f"({report.samples_per_s:,.0f}/s), energy {energy}"
    )
    console.print(f"wrote {out / 'metrics.json'}", soft_wrap=True, highlight=False)  # one line


def _progress(console: Console) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )
