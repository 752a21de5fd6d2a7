"""Road-sensor graphs: positions, road edges, cloudlets, and the weighted adjacency.

The packaged graphs (``p2pfl/ml/data/metr-la`` and ``pems-bay``) are the real sensor positions of
the METR-LA (207 sensors) and PeMS-BAY (325 sensors) benchmarks, their road-neighbour edges and
the 7 cloudlets (radius 8 km) of the semi-decentralized ST-GNN study. The same loader reads a
user's own folder with ``sensors.csv`` (index,sensor_id,latitude,longitude), ``road_edges.csv``
(a,b) and optionally ``cloudlets.json``.

Weighted adjacency (:func:`kernel_adjacency`): w_ij = exp(-d_ij^2 / sigma^2) with sigma the
standard deviation of all pairwise distances, weights below 0.1 cut. Without road distances, d is
the haversine distance; and because the all-pairs kernel over haversine connects about half of all
pairs (METR-LA: sigma = 7.0 km), the kernel is applied on the road edges only, which keeps the
graph as sparse as the road network (avg. degree 3.3 in METR-LA) while weighting near neighbours
more. With a dense ``distances`` matrix from a user (DCRNN's road distances), pass
``edges_only=False`` to get the benchmark's usual adjacency.

Two adjacencies are offered by name (:data:`ADJACENCIES`, the traffic tasks' ``adjacency``
option): ``"road"`` is the kernel on the road edges above; ``"kernel"`` is the study's
distance-kernel graph: the same Gaussian kernel and 0.1 cut over *all* pairs of sensors within
``kernel_radius_km`` of each other (default: the cloudlet radius), as the DCRNN benchmarks
threshold their kernel, so every sensor is connected to every sensor near it whether or not a
road joins them. It is much denser (METR-LA: average degree 3.3 on roads, 74 with the
kernel at 8 km), and so are the 2-hop halos each cloudlet must fetch.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "ADJACENCIES",
    "GRAPHS",
    "Cloudlet",
    "GraphFileError",
    "SensorGraph",
    "haversine_km",
    "kernel_adjacency",
    "load_graph",
    "scaled_laplacian",
]

GRAPHS = ("metr-la", "pems-bay")
ADJACENCIES = ("road", "kernel")
_EARTH_RADIUS_KM = 6371.0088


class GraphFileError(ValueError):
    """A sensor-graph file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Cloudlet:
    id: int
    lat: float
    lon: float


@dataclass(frozen=True)
class SensorGraph:
    """A sensor network: one row per sensor, undirected road edges, optional cloudlets."""

    name: str
    sensor_ids: tuple[str, ...]
    lat: np.ndarray  # [N] degrees
    lon: np.ndarray  # [N] degrees
    edges: np.ndarray  # [E, 2] int, undirected, each pair once
    cloudlets: tuple[Cloudlet, ...] = ()
    radius_km: float = 8.0
    source: str = ""
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_sensors(self) -> int:
        return len(self.sensor_ids)

    def distances_km(self) -> np.ndarray:
        """[N, N] haversine distances between sensors (cached)."""
        if "dist" not in self._cache:
            self._cache["dist"] = haversine_km(
                self.lat[:, None], self.lon[:, None], self.lat[None, :], self.lon[None, :]
            )
        return self._cache["dist"]

    def road_mask(self) -> np.ndarray:
        """[N, N] boolean: True where two sensors are direct road neighbours."""
        mask = np.zeros((self.num_sensors, self.num_sensors), dtype=bool)
        mask[self.edges[:, 0], self.edges[:, 1]] = True
        mask[self.edges[:, 1], self.edges[:, 0]] = True
        return mask

    def adjacency(self, kind: str = "road", radius_km: float | None = None) -> np.ndarray:
        """The weighted adjacency ``kind`` (one of :data:`ADJACENCIES`; see the module docstring).

        ``radius_km`` bounds the pairs of the ``"kernel"`` graph (default: the cloudlet radius).
        """
        if kind not in ADJACENCIES:
            raise ValueError(
                f"adjacency {kind!r} is unknown; choose one of {', '.join(ADJACENCIES)}"
            )
        if kind == "road":
            if "adj" not in self._cache:
                self._cache["adj"] = kernel_adjacency(self.distances_km(), self.road_mask())
            return self._cache["adj"]
        radius = self.radius_km if radius_km is None else float(radius_km)
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"kernel_radius_km must be a distance in km > 0, got {radius_km!r}")
        key = f"kernel:{radius!r}"
        if key not in self._cache:
            distances = self.distances_km()
            self._cache[key] = kernel_adjacency(distances, distances <= radius)
        return self._cache[key]


def haversine_km(
    lat1: np.ndarray | float,
    lon1: np.ndarray | float,
    lat2: np.ndarray | float,
    lon2: np.ndarray | float,
) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return np.asarray(2 * _EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))))


def kernel_adjacency(
    distances: np.ndarray, mask: np.ndarray | None = None, *, cut: float = 0.1
) -> np.ndarray:
    """Gaussian kernel exp(-d^2 / sigma^2), sigma = std of the finite off-diagonal distances.

    Weights below ``cut`` become 0; where ``mask`` is given, only masked pairs keep a weight.
    The diagonal is 0 (self-connections come from the Chebyshev T0 term).
    """
    n = distances.shape[0]
    off = ~np.eye(n, dtype=bool)
    finite = distances[off & np.isfinite(distances)]
    sigma = float(finite.std()) if finite.size else 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.exp(-np.square(distances / max(sigma, 1e-9)))
    w = np.where(np.isfinite(w) & (w >= cut) & off, w, 0.0)
    if mask is not None:
        w = np.where(mask, w, 0.0)
    return w.astype(np.float32)


def scaled_laplacian(adjacency: np.ndarray) -> np.ndarray:
    """2 L / lambda_max - I with L = I - D^-1/2 W D^-1/2 (symmetrized W), for Chebyshev convs."""
    w = np.maximum(adjacency, adjacency.T).astype(np.float64)
    n = w.shape[0]
    degree = w.sum(axis=1)
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    lap = np.eye(n) - inv_sqrt[:, None] * w * inv_sqrt[None, :]
    lam_max = float(np.linalg.eigvalsh(lap).max()) if n else 2.0
    lam_max = lam_max if lam_max > 1e-6 else 2.0
    scaled: np.ndarray = (2.0 * lap / lam_max - np.eye(n)).astype(np.float32)
    return scaled


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise GraphFileError(
                    f"{path}: missing column(s) {', '.join(missing)}; "
                    f"expected a header with {','.join(columns)}"
                )
            return list(reader)
    except FileNotFoundError:
        raise GraphFileError(f"{path}: file not found") from None


def _cell(path: Path, row: int, column: str, text: str, kind: type[float] | type[int]) -> float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise GraphFileError(
            f"{path}, data row {row}: column {column!r} = {text!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise GraphFileError(f"{path}, data row {row}: column {column!r} is not finite")
    return value


def load_graph(name_or_dir: str | Path) -> SensorGraph:
    """A packaged graph by name (``"metr-la"``, ``"pems-bay"``) or a folder with the same files."""
    if str(name_or_dir) in GRAPHS:
        folder = Path(str(resources.files("p2pfl.ml").joinpath("data", str(name_or_dir))))
        name = str(name_or_dir)
    else:
        folder = Path(name_or_dir)
        name = folder.name
        if not folder.is_dir():
            raise GraphFileError(
                f"{folder}: not a folder; give a packaged graph ({', '.join(GRAPHS)}) or a folder "
                "with sensors.csv and road_edges.csv"
            )
    sensors_path = folder / "sensors.csv"
    rows = _read_csv(sensors_path, ("index", "sensor_id", "latitude", "longitude"))
    if not rows:
        raise GraphFileError(f"{sensors_path}: no sensors listed")
    indices = [int(_cell(sensors_path, i, "index", r["index"], int)) for i, r in enumerate(rows, 1)]
    if sorted(indices) != list(range(len(rows))):
        raise GraphFileError(
            f"{sensors_path}: column 'index' must number the sensors 0..{len(rows) - 1} "
            "exactly once (it is the sensor's column in the speed table)"
        )
    order = np.argsort(indices)
    rows = [rows[i] for i in order]
    lat = np.array(
        [_cell(sensors_path, i, "latitude", r["latitude"], float) for i, r in enumerate(rows, 1)]
    )
    lon = np.array(
        [_cell(sensors_path, i, "longitude", r["longitude"], float) for i, r in enumerate(rows, 1)]
    )
    edges_path = folder / "road_edges.csv"
    edge_rows = _read_csv(edges_path, ("a", "b"))
    pairs: set[tuple[int, int]] = set()
    for i, r in enumerate(edge_rows, 1):
        a = int(_cell(edges_path, i, "a", r["a"], int))
        b = int(_cell(edges_path, i, "b", r["b"], int))
        for v in (a, b):
            if not 0 <= v < len(rows):
                raise GraphFileError(
                    f"{edges_path}, data row {i}: sensor index {v} is not in {sensors_path.name} "
                    f"(0..{len(rows) - 1})"
                )
        if a != b:
            pairs.add((min(a, b), max(a, b)))
    edges = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    cloudlets: tuple[Cloudlet, ...] = ()
    radius = 8.0
    cloudlets_path = folder / "cloudlets.json"
    if cloudlets_path.exists():
        try:
            spec = json.loads(cloudlets_path.read_text())
            radius = float(spec["radius_km"])
            cloudlets = tuple(
                Cloudlet(int(c["id"]), float(c["lat"]), float(c["lon"])) for c in spec["cloudlets"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise GraphFileError(
                f"{cloudlets_path}: expected {{'radius_km': km, 'cloudlets': [{{'id', 'lat', "
                f"'lon'}}, ...]}} ({exc!r})"
            ) from None
    return SensorGraph(
        name=name,
        sensor_ids=tuple(r["sensor_id"] for r in rows),
        lat=lat,
        lon=lon,
        edges=edges,
        cloudlets=cloudlets,
        radius_km=radius,
        source=str(folder),
    )
