"""Sensor graphs, synthetic speeds, real-readings loaders, windows and cloudlet partitions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl.ml.forecast import SpeedWindows
from p2pfl.ml.partition import k_hop_halo, partition_cloudlets
from p2pfl.ml.readings import ReadingsError, load_speeds
from p2pfl.ml.synthetic import STEPS_PER_DAY, generate_speeds
from p2pfl.ml.traffic import GraphFileError, load_graph, scaled_laplacian


@pytest.fixture(scope="module")
def metr_la_week() -> np.ndarray:
    return generate_speeds(load_graph("metr-la"), days=7, seed=0)


def test_packaged_graphs_have_the_published_sensor_counts() -> None:
    la, bay = load_graph("metr-la"), load_graph("pems-bay")
    assert (la.num_sensors, bay.num_sensors) == (207, 325)
    assert len(la.cloudlets) == len(bay.cloudlets) == 7 and la.radius_km == 8
    adj = la.adjacency()
    assert adj.shape == (207, 207) and np.allclose(adj, adj.T)
    assert ((adj > 0) == la.road_mask()).all()  # kernel weights on road edges, none cut
    assert adj.max() <= 1 and adj[adj > 0].min() >= 0.1


def test_scaled_laplacian_has_spectrum_in_minus_one_one() -> None:
    lap = scaled_laplacian(load_graph("metr-la").adjacency())
    eig = np.linalg.eigvalsh(lap.astype(np.float64))
    assert eig.min() >= -1 - 1e-4 and abs(eig.max() - 1) < 1e-4


def test_synthetic_speeds_look_like_metr_la(metr_la_week: np.ndarray) -> None:
    speeds = metr_la_week
    assert speeds.shape == (7 * STEPS_PER_DAY, 207) and speeds.dtype == np.float32
    observed = speeds[~np.isnan(speeds)]
    assert 50 < observed.mean() < 58 and 16 < observed.std() < 23
    assert 0.01 < np.isnan(speeds).mean() < 0.05
    day = speeds[:STEPS_PER_DAY]  # a Thursday: rush hours are slower than the night
    hourly = np.nanmean(day.reshape(24, 12, -1), axis=(1, 2))
    assert hourly[8] < hourly[3] - 20 and hourly[17] < hourly[3] - 20


def test_synthetic_speeds_are_deterministic_per_seed(metr_la_week: np.ndarray) -> None:
    graph = load_graph("metr-la")
    again = generate_speeds(graph, days=7, seed=0)
    np.testing.assert_array_equal(again, metr_la_week)
    assert not np.array_equal(generate_speeds(graph, days=7, seed=1), metr_la_week, equal_nan=True)


def test_windows_split_in_time_and_zscore_with_training_statistics_only() -> None:
    speeds = np.arange(1000, dtype=np.float32)[:, None].repeat(3, axis=1)
    speeds[900:] = 10_000.0  # extreme values in the test split must not move the statistics
    w = SpeedWindows(speeds)
    assert w.bounds == {"train": (0, 700), "val": (700, 850), "test": (850, 1000)}
    assert w.mean == pytest.approx(349.5) and w.std == pytest.approx(speeds[:700, 0].std())
    for split, (lo, hi) in w.bounds.items():
        starts = w.starts(split)
        assert starts.min() == lo and w.target_steps(starts).max() == hi - 1
    targets = w.target_steps(torch.tensor([0]))
    assert targets.tolist() == [[14, 17, 23]]  # last input is step 11; +3, +6, +12


def test_cloudlet_partition_of_metr_la_gives_each_sensor_at_most_one_owner() -> None:
    graph = load_graph("metr-la")
    part = partition_cloudlets(graph)
    owned = np.concatenate(part.members)
    assert len(owned) == len(set(owned.tolist())) == 207 - part.left_out
    for c in range(7):
        assert not set(part.halos[c].tolist()) & set(part.members[c].tolist())
        assert (part.owner[part.halos[c]] >= 0).all()
        assert part.halo_mb(c, STEPS_PER_DAY) == pytest.approx(len(part.halos[c]) * 288 * 4 / 1e6)
    assert all(c not in part.neighbours[c] for c in range(7))
    assert all(c in part.neighbours[d] for c in range(7) for d in part.neighbours[c])


def _line_graph(tmp_path: Path) -> Path:
    # Sensors 0..7 one km apart on a road along the equator, sensor 8 far away (left out).
    km = 1 / 111.195
    lons = [i * km for i in range(8)] + [40 * km]
    rows = ["index,sensor_id,latitude,longitude"]
    rows += [f"{i},{100 + i},0.0,{lon}" for i, lon in enumerate(lons)]
    (tmp_path / "sensors.csv").write_text("\n".join(rows) + "\n")
    edges = ["a,b"] + [f"{i},{i + 1}" for i in range(8)]
    (tmp_path / "road_edges.csv").write_text("\n".join(edges) + "\n")
    cloudlets = [{"id": 0, "lat": 0.0, "lon": 1 * km}, {"id": 1, "lat": 0.0, "lon": 6 * km}]
    (tmp_path / "cloudlets.json").write_text(json.dumps({"radius_km": 2.5, "cloudlets": cloudlets}))
    return tmp_path


def test_halo_is_the_two_hop_neighbourhood_on_a_hand_made_graph(tmp_path: Path) -> None:
    graph = load_graph(_line_graph(tmp_path))
    part = partition_cloudlets(graph, range_km=10)
    assert part.owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert part.left_out == 1
    assert part.halos[0].tolist() == [4, 5]
    assert part.halos[1].tolist() == [2, 3]  # sensor 8 is left out, so not in the halo
    assert part.subgraph(1).tolist() == [4, 5, 6, 7, 2, 3]
    assert part.halo_sources(0) == {1: 2}
    assert part.neighbours == ((1,), (0,))
    assert partition_cloudlets(graph, range_km=4).neighbours == ((), ())


def test_k_hop_halo_counts_hops_exactly() -> None:
    adj = np.zeros((6, 6))
    for a, b in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]:
        adj[a, b] = 1.0
    assert k_hop_halo(adj, np.array([0]), 1).tolist() == [1]
    assert k_hop_halo(adj, np.array([0]), 3).tolist() == [1, 2, 3]
    assert k_hop_halo(adj, np.array([2, 3]), 2).tolist() == [0, 1, 4, 5]


def test_graph_file_errors_name_the_file_and_problem(tmp_path: Path) -> None:
    folder = _line_graph(tmp_path)
    (folder / "road_edges.csv").write_text("a,b\n0,99\n")
    with pytest.raises(GraphFileError, match=r"road_edges.csv, data row 1: sensor index 99"):
        load_graph(folder)
    (folder / "sensors.csv").write_text("index,sensor_id,latitude\n0,1,0.0\n")
    with pytest.raises(GraphFileError, match=r"sensors.csv: missing column\(s\) longitude"):
        load_graph(folder)


def _small_graph(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_graph(_line_graph(tmp_path))


def test_csv_readings_are_matched_to_sensors_by_id(tmp_path: Path) -> None:
    graph = _small_graph(tmp_path)
    ids = list(reversed(graph.sensor_ids))
    lines = ["timestamp," + ",".join(ids)]
    for t in range(300):
        values = [str(float(int(sid) + t % 100)) if t != 5 else "" for sid in ids]
        lines.append(
            f"{np.datetime64('2012-03-01T00:00') + np.timedelta64(5 * t, 'm')}," + ",".join(values)
        )
    path = tmp_path / "speeds.csv"
    path.write_text("\n".join(lines) + "\n")
    speeds = load_speeds(path, graph)
    assert speeds.shape == (300, 9)
    assert speeds[0].tolist() == [float(100 + i) for i in range(9)]
    assert np.isnan(speeds[5]).all()


def test_npz_readings_treat_zero_as_missing(tmp_path: Path) -> None:
    graph = _small_graph(tmp_path)
    table = np.full((300, 9), 60.0)
    table[10, 2] = 0.0
    np.savez(tmp_path / "speeds.npz", speeds=table)
    speeds = load_speeds(tmp_path / "speeds.npz", graph)
    assert np.isnan(speeds[10, 2]) and np.isnan(speeds).sum() == 1


def test_hdf5_readings_in_the_published_pandas_layout(tmp_path: Path) -> None:
    # The published METR-LA / PeMS-BAY files are pandas HDFStore tables under key "df": integer
    # sensor ids as column labels (axis0, block0_items), timestamps (axis1), values block0_values.
    h5py = pytest.importorskip("h5py")
    graph = _small_graph(tmp_path)
    ids = np.array([int(sid) for sid in reversed(graph.sensor_ids)], dtype=np.int64)
    table = np.array([[float(sid) + t % 100 for sid in ids] for t in range(300)])
    table[7, 0] = 0.0
    path = tmp_path / "metr-la.h5"
    with h5py.File(path, "w") as f:
        df = f.create_group("df")
        df["axis0"] = ids
        df["axis1"] = np.arange(300, dtype=np.int64) * 300_000_000_000
        df["block0_items"] = ids
        df["block0_values"] = table
    speeds = load_speeds(path, graph)
    assert speeds.shape == (300, 9)
    assert speeds[0].tolist() == [float(sid) for sid in graph.sensor_ids]
    assert np.isnan(speeds[7, graph.sensor_ids.index(str(ids[0]))])


def test_hdf5_without_the_published_layout_is_refused_by_name(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["speed"] = np.zeros((300, 9))
    with pytest.raises(ReadingsError, match="not the published layout") as info:
        load_speeds(path, _small_graph(tmp_path))
    assert "other.h5" in str(info.value)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (np.full((300, 8), 60.0), "8 sensor columns but the graph"),
        (np.full((300,), 60.0), "expected a 2-D table"),
        (np.full((20, 9), 60.0), "only 20 time steps"),
    ],
)
def test_wrong_npz_shapes_are_refused_with_the_file_name(
    tmp_path: Path, table: np.ndarray, message: str
) -> None:
    graph = _small_graph(tmp_path)
    np.savez(tmp_path / "bad.npz", speeds=table)
    with pytest.raises(ReadingsError, match=message) as info:
        load_speeds(tmp_path / "bad.npz", graph)
    assert "bad.npz" in str(info.value)


def test_missing_sensors_and_empty_columns_are_named(tmp_path: Path) -> None:
    graph = _small_graph(tmp_path)
    table = np.full((300, 9), 55.0)
    table[:, 3] = np.nan
    np.savez(tmp_path / "nan.npz", speeds=table)
    with pytest.raises(
        ReadingsError, match=r"nan.npz: 1 sensor column\(s\) hold no reading at all: 103"
    ):
        load_speeds(tmp_path / "nan.npz", graph)
    np.savez(tmp_path / "ids.npz", speeds=table[:, :8], sensor_ids=np.array(graph.sensor_ids[:8]))
    with pytest.raises(
        ReadingsError, match=r"ids.npz: 1 sensor\(s\) of graph .* have no column: 108"
    ):
        load_speeds(tmp_path / "ids.npz", graph)
    (tmp_path / "bad.csv").write_text(",".join(graph.sensor_ids) + "\n" + "1," * 8 + "x\n")
    with pytest.raises(ReadingsError, match=r"bad.csv, line 2, sensor '108': 'x' is not a number"):
        load_speeds(tmp_path / "bad.csv", graph)


def test_hdf5_without_h5py_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now raises ImportError
    (tmp_path / "metr-la.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(ReadingsError, match=r"metr-la.h5: reading HDF5 needs h5py"):
        load_speeds(tmp_path / "metr-la.h5", _small_graph(tmp_path))


def test_kernel_adjacency_links_every_pair_within_its_radius_and_grows_the_halos() -> None:
    from p2pfl.ml.traffic import load_graph

    graph = load_graph("metr-la")
    road, kernel = graph.adjacency("road"), graph.adjacency("kernel")
    distances = graph.distances_km()
    near = (distances <= graph.radius_km) & ~np.eye(graph.num_sensors, dtype=bool)
    assert ((kernel > 0) <= near).all()  # nothing beyond the radius
    assert (kernel[kernel > 0] >= 0.1).all()  # the benchmarks' cut
    assert (kernel > 0).sum() > 10 * (road > 0).sum()
    small = graph.adjacency("kernel", 2.0)
    assert ((small > 0) <= (distances <= 2.0)).all() and (small > 0).sum() < (kernel > 0).sum()
    on_roads = partition_cloudlets(graph)
    on_kernel = partition_cloudlets(graph, adjacency="kernel")
    for c in range(len(graph.cloudlets)):
        assert len(on_kernel.halos[c]) > 5 * len(on_roads.halos[c])
    with pytest.raises(ValueError, match="adjacency 'grid' is unknown"):
        graph.adjacency("grid")


def test_the_adjacency_option_changes_the_model_graph_and_the_halo() -> None:
    from p2pfl.learning.features import feature_plan
    from p2pfl.ml.forecast import TrafficTask

    road = TrafficTask(days=2)
    kernel = TrafficTask(days=2, adjacency="kernel")
    assert len(kernel.node_data(0, 7).nodes) > len(road.node_data(0, 7).nodes)
    ids = [f"n{i}" for i in range(7)]  # the halo asked of the owners follows the graph too
    plans = [feature_plan(t, 0, ids) for t in (road, kernel)]
    sizes = [sum(len(s) for s in p.needs.values()) for p in plans if p is not None]
    assert sizes == [len(road.partition.halos[0]), len(kernel.partition.halos[0])]
    assert sizes[1] > sizes[0]
    central_road, central_kernel = road.central_data(), kernel.central_data()
    assert not np.allclose(central_road.laplacian.numpy(), central_kernel.laplacian.numpy())
    with pytest.raises(ValueError, match="adjacency"):
        TrafficTask(days=2, adjacency="grid")
    with pytest.raises(ValueError, match="kernel_radius_km applies"):
        TrafficTask(days=2, kernel_radius_km=4.0)
