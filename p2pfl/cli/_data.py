"""``p2pfl data``: prepare a graph task's readings for a deployment of cloudlet daemons.

``p2pfl data split`` cuts one table of speed readings (the published HDF5 / CSV / NPZ layouts that
``p2pfl.ml.readings`` reads, or the task's synthetic speeds with ``--synthetic DAYS``) into one
NPZ file per cloudlet, ``cloudlet-<i>.npz``, holding only the sensors that cloudlet owns:
``speeds`` [time, own sensors] float32 (0 = missing, the published convention) and their
``sensor_ids``. Give cloudlet i's daemon its file as ``[task] data``; it asks the owners for its
halo's readings over the network. Sensors outside every cloudlet's radius go into no file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

_GRAPH_TASKS = ("traffic-metr-la", "traffic-pems-bay")


@click.group()
def data() -> None:
    """Prepare data for a deployment (split readings into one file per cloudlet)."""


@data.command()
@click.argument(
    "readings",
    required=False,
    type=click.Path(dir_okay=False, path_type=Path),
)
@click.option(
    "--task",
    "task_name",
    type=click.Choice(_GRAPH_TASKS),
    default="traffic-metr-la",
    show_default=True,
    help="The graph task whose cloudlets own the sensors.",
)
@click.option(
    "--graph",
    default=None,
    help="A sensor-graph folder instead of the task's packaged graph.",
)
@click.option(
    "--synthetic",
    "days",
    type=click.IntRange(min=1),
    default=None,
    help="Split DAYS of the task's synthetic speeds instead of a readings file.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --synthetic.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for cloudlet-<i>.npz (created; existing cloudlet files are refused).",
)
def split(
    readings: Path | None,
    task_name: str,
    graph: str | None,
    days: int | None,
    seed: int,
    out: Path,
) -> None:
    """Cut READINGS (or --synthetic DAYS) into one file per cloudlet, own sensors only."""
    from p2pfl.cli._errors import EXIT_DATA, EXIT_USAGE, fail

    if (readings is None) == (days is None):
        raise fail("give either a READINGS file or --synthetic DAYS; see --help", EXIT_USAGE)
    import numpy as np

    from p2pfl.ml.partition import partition_cloudlets
    from p2pfl.ml.readings import ReadingsError, load_speeds
    from p2pfl.ml.synthetic import generate_speeds
    from p2pfl.ml.traffic import GraphFileError, load_graph

    try:
        sensor_graph = load_graph(graph or task_name.removeprefix("traffic-"))
        partition = partition_cloudlets(sensor_graph)
    except (GraphFileError, ValueError) as exc:
        raise fail(f"--graph: {exc}", EXIT_DATA) from None
    if readings is not None:
        try:
            speeds = load_speeds(readings, sensor_graph)
        except ReadingsError as exc:
            raise fail(str(exc), EXIT_DATA) from None
    else:
        assert days is not None
        speeds = generate_speeds(sensor_graph, days=days, seed=seed)
    existing = sorted(out.glob("cloudlet-*.npz")) if out.is_dir() else []
    if existing:
        raise fail(f"{existing[0]}: already there; split into an empty folder (--out)", EXIT_USAGE)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"--out {out}: {exc.strerror}; choose another folder", EXIT_USAGE) from None
    manifest: dict[str, Any] = {
        "graph": sensor_graph.name,
        "source": str(readings) if readings is not None else f"synthetic, {days} days, seed {seed}",
        "steps": int(speeds.shape[0]),
        "cloudlets": [],
    }
    for cloudlet, members in enumerate(partition.members):
        ids = np.array([sensor_graph.sensor_ids[i] for i in members])
        own = np.where(np.isfinite(speeds[:, members]), speeds[:, members], 0.0)
        path = out / f"cloudlet-{cloudlet}.npz"
        np.savez(path, speeds=own.astype(np.float32), sensor_ids=ids)
        manifest["cloudlets"].append(
            {
                "cloudlet": cloudlet,
                "file": path.name,
                "sensors": len(members),
            }
        )
        click.echo(f"{path}: cloudlet {cloudlet}, {len(members)} sensors, {speeds.shape[0]} steps")
    (out / "split.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if partition.left_out:
        click.echo(f"{partition.left_out} sensors are outside every cloudlet: in no file")
