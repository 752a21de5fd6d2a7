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

A file is checked before use; every mismatch raises :class:`ReadingsError`, one line naming the
file (and line or row) and what to fix: the matrix's columns against its sensor ids (count,
duplicates, ids not in the graph), the graph's sensors without a column, non-numeric cells or a
non-numeric dtype, speeds outside 0..``MAX_MPH``, and timestamps (a CSV's first column, an HDF5
file's ``df/axis1``, an NPZ's optional ``timestamps``) that are not in order or not one
5-minute step apart: row i must be step i, so a gap is refused (add rows with empty cells for the
missing steps) rather than shifting every later reading's time of day.
"""

from __future__ import annotations

import csv
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np

from p2pfl.ml.traffic import SensorGraph

__all__ = ["MAX_MPH", "MIN_STEPS", "STEP_NS", "ReadingsError", "load_speeds"]

MIN_STEPS = 12 * 24  # a day: enough for windows in each of the 70/15/15 splits
STEP_NS = 5 * 60 * 1_000_000_000
"""One time step, 5 minutes, in nanoseconds."""
MAX_MPH = 250.0
"""Readings above this are not speeds: a file holding one is refused, and so is an owner's reply
(:mod:`p2pfl.learning.features`), so an owner never serves what its requesters refuse."""


class ReadingsError(ValueError):
    """A readings file does not fit the sensor graph; the message says which file and why."""


_Read = tuple[list[str] | None, np.ndarray, np.ndarray | None]
"""Sensor ids (None: graph order), values [time, sensors], timestamps (int64 ns) or None."""


def _read_csv(path: Path) -> _Read:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ReadingsError(f"{path}: empty file; expected a header row of sensor ids")
        rows = list(reader)
    first_is_time = bool(rows) and bool(rows[0]) and not _is_number(rows[0][0])
    first_is_time = first_is_time and rows[0][0] != ""
    columns = header[1:] if first_is_time else header
    values = np.full((len(rows), len(columns)), np.nan, dtype=np.float64)
    stamps = np.zeros(len(rows), dtype=np.int64) if first_is_time else None
    for r, row in enumerate(rows):
        cells = row[1:] if first_is_time else row
        if len(cells) != len(columns) or not row:
            raise ReadingsError(
                f"{path}, line {r + 2}: {len(cells)} values but {len(columns)} sensor columns; "
                "every row needs one cell per column (empty for a missing reading)"
            )
        if stamps is not None:
            try:
                when = datetime.fromisoformat(row[0].strip())
            except ValueError:
                raise ReadingsError(
                    f"{path}, line {r + 2}: timestamp {row[0]!r} is not a date-time; write "
                    "ISO 8601 (2012-03-01 00:05:00) in the first column"
                ) from None
            stamps[r] = int(np.datetime64(when.replace(tzinfo=None), "ns").astype(np.int64))
        for c, cell in enumerate(cells):
            if cell.strip() == "":
                continue
            try:
                values[r, c] = float(cell)
            except ValueError:
                raise ReadingsError(
                    f"{path}, line {r + 2}, sensor {columns[c]!r}: {cell!r} is not a number; "
                    "write a speed in mph, or leave the cell empty for a missing reading"
                ) from None
    return [c.strip() for c in columns], values, stamps


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_npz(path: Path) -> _Read:
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        others = [n for n in names if n not in ("sensor_ids", "timestamps")]
        if "speeds" in names:
            key = "speeds"
        elif len(others) == 1:
            key = others[0]
        else:
            raise ReadingsError(
                f"{path}: expected an array named 'speeds' (found {', '.join(names) or 'none'}); "
                "save the time x sensors table as 'speeds'"
            )
        values = _numeric(path, f"array {key!r}", archive[key])
        ids = None
        if "sensor_ids" in names:
            raw_ids = archive["sensor_ids"]
            if raw_ids.ndim != 1:
                raise ReadingsError(
                    f"{path}: 'sensor_ids' has shape {raw_ids.shape}; expected one id per column"
                )
            ids = [str(x).strip() for x in raw_ids.tolist()]
        stamps = None
        if "timestamps" in names:
            raw = archive["timestamps"]
            if raw.ndim != 1 or raw.dtype.kind not in "iuM":
                raise ReadingsError(
                    f"{path}: 'timestamps' has dtype {raw.dtype} and shape {raw.shape}; expected "
                    "one datetime64 (or int64 nanoseconds) per row"
                )
            stamps = raw.astype("datetime64[ns]").astype(np.int64) if raw.dtype.kind == "M" else raw
    return ids, values, None if stamps is None else np.asarray(stamps, dtype=np.int64)


def _numeric(path: Path, what: str, array: np.ndarray) -> np.ndarray:
    """``array`` as float64, refused unless its dtype holds real numbers (ints or floats)."""
    if array.dtype.kind not in "iuf":
        raise ReadingsError(
            f"{path}: {what} has dtype {array.dtype}; expected numbers (speeds in mph as float "
            "or int), convert it before use"
        )
    return np.asarray(array, dtype=np.float64)


def _read_h5(path: Path) -> _Read:
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
        values = _numeric(path, "df/block0_values", np.asarray(table["block0_values"]))
        ids_key = "block0_items" if "block0_items" in table else "axis0"
        ids = None
        if ids_key in table:
            ids = [x.decode() if isinstance(x, bytes) else str(x) for x in table[ids_key][()]]
        stamps = None
        if "axis1" in table:
            raw = np.asarray(table["axis1"][()])
            if raw.ndim != 1 or raw.dtype.kind not in "iu":
                raise ReadingsError(
                    f"{path}: df/axis1 (the timestamps) has dtype {raw.dtype}; expected int64 "
                    "nanoseconds, as pandas writes them"
                )
            stamps = raw.astype(np.int64)
    return ids, values, stamps


def _check_ids(path: Path, ids: list[str], columns: int, graph: SensorGraph) -> None:
    if len(ids) != columns:
        raise ReadingsError(
            f"{path}: {len(ids)} sensor ids but {columns} columns of readings; give one id per "
            "column (time x sensors), in column order"
        )
    seen: set[str] = set()
    for sid in ids:
        if sid in seen:
            raise ReadingsError(f"{path}: sensor id {sid!r} names two columns; keep one")
        seen.add(sid)
    known = set(graph.sensor_ids)
    unknown = [sid for sid in ids if sid not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ReadingsError(
            f"{path}: {len(unknown)} column(s) name sensors not in graph {graph.name!r}: "
            f"{shown}; remove those columns or use the graph whose sensors.csv lists them"
        )


def _check_time(path: Path, stamps: np.ndarray, rows: int, csv_lines: bool) -> None:
    """Timestamps in order, one 5-minute step apart (row i is step i)."""
    if stamps.shape[0] != rows:
        raise ReadingsError(
            f"{path}: {stamps.shape[0]} timestamps but {rows} rows of readings; give one per row"
        )
    steps = np.diff(stamps)
    bad = np.flatnonzero(steps != STEP_NS)
    if bad.size == 0:
        return
    r = int(bad[0]) + 1
    at = f"line {r + 2}" if csv_lines else f"row {r}"
    before, after = (str(np.datetime64(int(stamps[i]), "ns")) for i in (r - 1, r))
    step = int(steps[r - 1])
    if step <= 0:
        raise ReadingsError(
            f"{path}, {at}: timestamp {after} is not after the previous one ({before}); "
            "sort the rows by time and drop duplicates"
        )
    if step % STEP_NS == 0:
        raise ReadingsError(
            f"{path}, {at}: timestamps jump from {before} to {after} "
            f"({step // STEP_NS - 1} missing 5-minute steps); add a row with empty cells "
            "(missing readings) for each missing step"
        )
    raise ReadingsError(
        f"{path}, {at}: timestamps {before} and {after} are not 5 minutes apart; "
        "readings must come every 5 minutes (resample the file)"
    )


def load_speeds(
    path: Path, graph: SensorGraph, *, zero_is_missing: bool = True, partial: bool = False
) -> np.ndarray:
    """[time, sensors] float32 speeds in the graph's sensor order, NaN where missing.

    ``partial``: the file may hold a subset of the graph's sensors (by ``sensor_ids``, as
    ``p2pfl data split`` writes one cloudlet's file); the others' columns are all NaN.
    """
    path = Path(path)
    if not path.is_file():
        raise ReadingsError(f"{path}: file not found; check the path")
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".npz": _read_npz, ".h5": _read_h5, ".hdf5": _read_h5}
    if suffix not in readers:
        raise ReadingsError(f"{path}: unknown format {suffix!r}; use .csv, .npz or .h5")
    ids: list[str] | None
    try:
        ids, values, stamps = readers[suffix](path)
    except ReadingsError:
        raise
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise ReadingsError(
            f"{path}: cannot be read as {suffix[1:].upper()} ({exc}); is it the right file?"
        ) from None
    if values.ndim != 2:
        raise ReadingsError(
            f"{path}: expected a 2-D table time x sensors, got shape {values.shape}; "
            "save one row per 5-minute step and one column per sensor"
        )
    if stamps is not None:
        _check_time(path, stamps, values.shape[0], csv_lines=suffix == ".csv")
    expected = graph.num_sensors
    if ids is not None:
        _check_ids(path, ids, values.shape[1], graph)
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
                raise ReadingsError(
                    f"{path}: no column is a sensor of graph {graph.name!r}; is it the right file?"
                )
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
    out_of_range = np.isfinite(values) & ((values < 0) | (values > MAX_MPH))
    if out_of_range.any():
        r, c = (int(x[0]) for x in np.nonzero(out_of_range))
        column = graph.sensor_ids[c]  # columns are in the graph's order by now
        raise ReadingsError(
            f"{path}: {int(out_of_range.sum())} reading(s) outside 0..{MAX_MPH:g} mph (first: "
            f"row {r}, sensor {column}, {values[r, c]:g}); speeds are mph, a missing one is 0 or "
            "empty"
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
