"""Real speed readings from files a user has, checked against the sensor graph.

Accepted layouts (time x sensors, mph, 5-minute steps):
- CSV: a header row naming the sensors by ``sensor_id`` (as in ``sensors.csv``); a first column
  that is not a sensor (a timestamp) is skipped. Empty cells are missing readings.
- NPZ: an array ``speeds`` (or the file's only array) of shape [time, sensors], and optionally
  ``sensor_ids``; without ids, the columns are in ``sensors.csv`` index order.
- HDF5 (``.h5``, needs h5py: ``pip install 'p2pfl-edge[hdf5]'``): the published METR-LA /
  PeMS-BAY layout, a pandas table under key ``df`` (``df/block0_values`` with the sensor ids in
  ``df/axis0``, or ``df/block0_items``).

Zeros are missing readings in the published files; they become NaN (``zero_is_missing``).
Every problem raises :class:`ReadingsError` naming the file and what is wrong.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from p2pfl.ml.traffic import SensorGraph

__all__ = ["MIN_STEPS", "ReadingsError", "load_speeds"]

MIN_STEPS = 12 * 24  # a day: enough for windows in each of the 70/15/15 splits


class ReadingsError(ValueError):
    """A readings file does not fit the sensor graph; the message says which file and why."""


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ReadingsError(f"{path}: empty file; expected a header row of sensor ids")
        rows = list(reader)
    first_is_time = bool(rows) and not _is_number(rows[0][0]) and rows[0][0] != ""
    columns = header[1:] if first_is_time else header
    values = np.full((len(rows), len(columns)), np.nan, dtype=np.float64)
    for r, row in enumerate(rows):
        cells = row[1:] if first_is_time else row
        if len(cells) != len(columns):
            raise ReadingsError(
                f"{path}, line {r + 2}: {len(cells)} values but {len(columns)} sensor columns"
            )
        for c, cell in enumerate(cells):
            if cell.strip() == "":
                continue
            try:
                values[r, c] = float(cell)
            except ValueError:
                raise ReadingsError(
                    f"{path}, line {r + 2}, sensor {columns[c]!r}: {cell!r} is not a number"
                ) from None
    return [c.strip() for c in columns], values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_npz(path: Path) -> tuple[list[str] | None, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if "speeds" in names:
            values = archive["speeds"]
        elif len([n for n in names if n != "sensor_ids"]) == 1:
            values = archive[next(n for n in names if n != "sensor_ids")]
        else:
            raise ReadingsError(
                f"{path}: expected an array named 'speeds' (found {', '.join(names) or 'none'})"
            )
        ids = [str(s) for s in archive["sensor_ids"].tolist()] if "sensor_ids" in names else None
    return ids, np.asarray(values, dtype=np.float64)


def _read_h5(path: Path) -> tuple[list[str] | None, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise ReadingsError(
            f"{path}: reading HDF5 needs h5py; install it with pip install 'p2pfl-edge[hdf5]' "
            "or convert the file to CSV/NPZ"
        ) from None
    with h5py.File(path, "r") as f:
        if "df" not in f or "block0_values" not in f["df"]:
            raise ReadingsError(
                f"{path}: not the published layout (a pandas table under key 'df' with "
                "'df/block0_values'); found keys " + ", ".join(f.keys())
            )
        table = f["df"]
        values = np.asarray(table["block0_values"], dtype=np.float64)
        ids_key = "block0_items" if "block0_items" in table else "axis0"
        ids = None
        if ids_key in table:
            ids = [x.decode() if isinstance(x, bytes) else str(x) for x in table[ids_key][()]]
    return ids, values


def load_speeds(
    path: Path, graph: SensorGraph, *, zero_is_missing: bool = True, partial: bool = False
) -> np.ndarray:
    """[time, sensors] float32 speeds in the graph's sensor order, NaN where missing.

    ``partial``: the file may hold a subset of the graph's sensors (by ``sensor_ids``, as
    ``p2pfl data split`` writes one cloudlet's file); the others' columns are all NaN.
    """
    path = Path(path)
    if not path.is_file():
        raise ReadingsError(f"{path}: file not found")
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".npz": _read_npz, ".h5": _read_h5, ".hdf5": _read_h5}
    if suffix not in readers:
        raise ReadingsError(f"{path}: unknown format {suffix!r}; use .csv, .npz or .h5")
    ids: list[str] | None
    try:
        ids, values = readers[suffix](path)
    except ReadingsError:
        raise
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise ReadingsError(
            f"{path}: cannot be read as {suffix[1:].upper()} ({exc}); is it the right file?"
        ) from None
    if values.ndim != 2:
        raise ReadingsError(
            f"{path}: expected a 2-D table time x sensors, got shape {values.shape}"
        )
    expected = graph.num_sensors
    if ids is None:
        if values.shape[1] != expected:
            raise ReadingsError(
                f"{path}: {values.shape[1]} sensor columns but the graph {graph.name!r} has "
                f"{expected} sensors (shape is time x sensors; add 'sensor_ids' to match by id)"
            )
    else:
        position = {sid: i for i, sid in enumerate(ids)}
        missing = [sid for sid in graph.sensor_ids if sid not in position]
        if missing and partial:
            if len(missing) == len(graph.sensor_ids):
                raise ReadingsError(f"{path}: no column is a sensor of graph {graph.name!r}")
            full = np.full((values.shape[0], expected), np.nan)
            held = [i for i, sid in enumerate(graph.sensor_ids) if sid in position]
            full[:, held] = values[:, [position[graph.sensor_ids[i]] for i in held]]
            values = full
        elif missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ReadingsError(
                f"{path}: {len(missing)} sensor(s) of graph {graph.name!r} have no column: {shown}"
            )
        else:
            values = values[:, [position[sid] for sid in graph.sensor_ids]]
    if values.shape[0] < MIN_STEPS:
        raise ReadingsError(
            f"{path}: only {values.shape[0]} time steps; need at least {MIN_STEPS} (one day)"
        )
    if zero_is_missing:
        values = np.where(values == 0, np.nan, values)
    values = np.where(np.isfinite(values), values, np.nan)
    empty = np.flatnonzero(np.isnan(values).all(axis=0))
    if partial and ids is not None:
        empty = np.array([i for i in empty if graph.sensor_ids[i] in position], dtype=np.int64)
    if empty.size:
        shown = ", ".join(graph.sensor_ids[i] for i in empty[:5]) + (
            " ..." if empty.size > 5 else ""
        )
        raise ReadingsError(
            f"{path}: {empty.size} sensor column(s) hold no reading at all: {shown}; "
            "remove those sensors from sensors.csv or supply their readings"
        )
    return values.astype(np.float32)
