"""Readings files are checked before use: every malformed file is one ReadingsError line naming
the file and what to fix, never another exception; and `p2pfl train`, `p2pfl data split` and
`p2pfl run` all exit 4 with that line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.cli import main as cli_main
from p2pfl.ml.readings import MIN_STEPS, ReadingsError, load_speeds
from p2pfl.ml.traffic import SensorGraph, load_graph

STEPS = MIN_STEPS + 12


def _graph(tmp: Path) -> SensorGraph:
    # Sensors 100..108 one km apart on a road along the equator, two cloudlets.
    folder = tmp / "graph"
    folder.mkdir(exist_ok=True)
    km = 1 / 111.195
    rows = ["index,sensor_id,latitude,longitude"]
    rows += [f"{i},{100 + i},0.0,{i * km}" for i in range(9)]
    (folder / "sensors.csv").write_text("\n".join(rows) + "\n")
    edges = ["a,b"] + [f"{i},{i + 1}" for i in range(8)]
    (folder / "road_edges.csv").write_text("\n".join(edges) + "\n")
    cloudlets = [{"id": 0, "lat": 0.0, "lon": 1 * km}, {"id": 1, "lat": 0.0, "lon": 6 * km}]
    (folder / "cloudlets.json").write_text(json.dumps({"radius_km": 5, "cloudlets": cloudlets}))
    return load_graph(folder)


MUTATIONS = (
    "columns_vs_ids",  # fewer/more columns than ids
    "duplicate_id",
    "unknown_id",
    "non_numeric_cell",
    "string_dtype",
    "bool_dtype",
    "unordered_time",
    "time_gap",
    "odd_step",
    "negative_speed",
    "too_fast",
    "short_row",
)
FORMATS = {
    "columns_vs_ids": ("npz", "h5"),
    "duplicate_id": ("csv", "npz", "h5"),
    "unknown_id": ("csv", "npz", "h5"),
    "non_numeric_cell": ("csv",),
    "string_dtype": ("npz",),
    "bool_dtype": ("npz", "h5"),
    "unordered_time": ("csv", "npz", "h5"),
    "time_gap": ("csv", "npz", "h5"),
    "odd_step": ("csv", "npz", "h5"),
    "negative_speed": ("csv", "npz", "h5"),
    "too_fast": ("csv", "npz", "h5"),
    "short_row": ("csv",),
}


def _write(path: Path, ids: list[str], values: np.ndarray, stamps: np.ndarray, cell: str) -> None:
    """``values`` [time, columns] as CSV / NPZ / HDF5; ``cell``: a CSV cell to put at (3, 1)."""
    if path.suffix == ".csv":
        text = ["timestamp," + ",".join(ids)]
        for r, row in enumerate(values):
            cells = [f"{v:g}" if np.isfinite(v) else "" for v in row]
            if r == 3 and cell:
                cells[1] = cell
            text.append(f"{np.datetime64(int(stamps[r]), 'ns')}," + ",".join(cells))
        path.write_text("\n".join(text) + "\n")
    elif path.suffix == ".npz":
        np.savez(path, speeds=values, sensor_ids=np.array(ids), timestamps=stamps)
    else:
        h5py = pytest.importorskip("h5py")
        with h5py.File(path, "w") as f:
            df = f.create_group("df")
            df["axis0"] = np.array([int(i) if i.isdigit() else -1 for i in ids])
            df["block0_items"] = np.array([i.encode() for i in ids])
            df["axis1"] = stamps
            df["block0_values"] = values


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    mutation=st.sampled_from(MUTATIONS),
    pick=st.integers(0, 2),
    where=st.integers(1, STEPS - 2),
    column=st.integers(0, 8),
    amount=st.integers(1, 40),
    order=st.permutations(range(9)),
)
def test_every_malformed_file_is_one_line_naming_the_file(
    tmp_path: Path,
    mutation: str,
    pick: int,
    where: int,
    column: int,
    amount: int,
    order: list[int],
) -> None:
    graph = _graph(tmp_path)
    formats = FORMATS[mutation]
    path = tmp_path / f"bad-{mutation}.{formats[pick % len(formats)]}"
    rng = np.random.default_rng(where)
    values: np.ndarray = rng.uniform(20.0, 70.0, size=(STEPS, 9))
    ids = [graph.sensor_ids[i] for i in order]
    stamps = np.datetime64("2012-03-01T00:00", "ns").astype(np.int64) + np.arange(
        STEPS, dtype=np.int64
    ) * (300 * 10**9)
    cell = ""
    if mutation == "columns_vs_ids":
        values = values[:, : 9 - 1 - column % 8] if amount % 2 else np.hstack([values] * 2)
    elif mutation == "duplicate_id":
        ids[column] = ids[(column + 1) % 9]
    elif mutation == "unknown_id":
        ids[column] = str(900 + amount)
    elif mutation == "non_numeric_cell":
        cell = ["fast", "12mph", "n/a", "--"][amount % 4]
    elif mutation == "string_dtype":
        values = values.astype(str)
    elif mutation == "bool_dtype":
        values = values > 40
    elif mutation == "unordered_time":
        stamps[where] = stamps[where - 1] - (amount % 3) * 300 * 10**9
    elif mutation == "time_gap":
        stamps[where:] += amount * 300 * 10**9
    elif mutation == "odd_step":
        stamps[where:] += amount * 10**9  # a few seconds off the 5-minute grid
    elif mutation == "negative_speed":
        values[where, column] = -float(amount)
    elif mutation == "too_fast":
        values[where, column] = 250.0 + amount
    elif mutation == "short_row":
        cell = "1\n" + ",".join(["5"] * 2)  # a line cut short inside the table
    _write(path, ids, values, stamps, cell)
    with pytest.raises(ReadingsError) as info:
        load_speeds(path, graph)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert ";" in message  # what is wrong; what to do


def test_the_same_table_well_formed_loads_in_every_format(tmp_path: Path) -> None:
    # The mutations above are what fails: the unmutated table passes every check.
    graph = _graph(tmp_path)
    values = np.random.default_rng(0).uniform(20.0, 70.0, size=(STEPS, 9))
    ids = list(reversed(graph.sensor_ids))
    start = np.datetime64("2012-03-01T00:00", "ns").astype(np.int64)
    stamps = start + np.arange(STEPS, dtype=np.int64) * (300 * 10**9)
    for suffix in ("csv", "npz", "h5"):
        path = tmp_path / f"good.{suffix}"
        _write(path, ids, values, stamps, "")
        speeds = load_speeds(path, graph)
        assert np.allclose(speeds[:, ::-1], values, atol=1e-3)


def _ids_mismatch(tmp: Path) -> Path:
    # The case: 100 columns of speeds and 207 sensor ids (an IndexError before).
    bad = tmp / "mismatch.npz"
    ids = np.array(load_graph("metr-la").sensor_ids)
    np.savez(bad, speeds=np.full((400, 100), 55.0, dtype=np.float32), sensor_ids=ids)
    return bad


def test_train_and_data_split_exit_4_with_one_line(tmp_path: Path) -> None:
    bad = _ids_mismatch(tmp_path)
    runner = CliRunner()
    for args in (
        ["data", "split", str(bad), "--out", str(tmp_path / "out")],
        [
            "train",
            "--task",
            "traffic-metr-la",
            "--readings",
            str(bad),
            "--out",
            str(tmp_path / "t"),
        ],
    ):
        result = runner.invoke(cli_main, args)
        assert result.exit_code == 4, (args, result.output)
        lines = result.output.strip().splitlines()
        assert lines[-1] == (
            f"p2pfl: {bad}: 207 sensor ids but 100 columns of readings; give one id per column "
            "(time x sensors), in column order"
        )


def test_the_daemon_exits_4_with_the_same_line(tmp_path: Path) -> None:
    bad = _ids_mismatch(tmp_path)
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nstate_dir = "state"\nruntime_dir = "run"\n[trust]\nmode = "open"\n'
        '[discovery]\nmdns = false\nlisten_host = "127.0.0.1"\n'
        f'[task]\nname = "traffic-metr-la"\nn_nodes = 7\nnode_index = 0\ndata = "{bad}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "run", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "207 sensor ids but 100 columns of readings" in lines[0]
    assert str(bad) in lines[0]
