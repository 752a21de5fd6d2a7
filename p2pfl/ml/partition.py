"""Splitting data across nodes.

Sample partitioners (deterministic for a ``numpy.random.Generator``), each returning one sorted
index array per node, disjoint, covering every sample, and no node empty:
- :func:`partition_iid`: a random permutation cut into near-equal parts.
- :func:`partition_dirichlet`: label skew; per class, shares drawn from Dirichlet(alpha).
- :func:`partition_quantity`: IID content, node sizes drawn from Dirichlet(alpha).

Graph partition (:func:`partition_cloudlets`): each sensor goes to the nearest cloudlet within
the radius; sensors outside every radius are left out of the whole study (counted) and of the
graph. Each cloudlet trains on its own sensors plus their k-hop halo (k = 2 matches Chebyshev
K = 3) and scores loss/metrics on its own sensors only. The halo's readings are what it must
receive from the cloudlets that own them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the sensor graph is for traffic tasks only: a digits node never loads it
    from p2pfl.ml.traffic import SensorGraph

__all__ = [
    "PARTITIONERS",
    "CloudletPartition",
    "k_hop_halo",
    "partition_cloudlets",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity",
    "partition_samples",
]


def _check(n_items: int, n_parts: int) -> None:
    if n_parts < 1:
        raise ValueError(f"need at least one node, got {n_parts}")
    if n_items < n_parts:
        raise ValueError(f"cannot give each of {n_parts} nodes a sample: only {n_items} samples")


def _fill_empty(parts: list[list[int]]) -> list[np.ndarray]:
    """Move one sample from the largest part into each empty one, so no node is empty."""
    for part in parts:
        if not part:
            largest = max(parts, key=len)
            part.append(largest.pop())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def partition_iid(n_items: int, n_parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    _check(n_items, n_parts)
    return [np.sort(p) for p in np.array_split(rng.permutation(n_items), n_parts)]


def partition_dirichlet(
    labels: np.ndarray, n_parts: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew: the samples of each class are shared out in Dirichlet(alpha) proportions.

    Small alpha (0.1) gives nodes with one or two classes; large alpha (100) approaches IID.
    """
    _check(len(labels), n_parts)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(n_parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(int(i) for i in chunk)
    return _fill_empty(parts)


def partition_quantity(
    n_items: int, n_parts: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantity skew: random samples, node sizes in Dirichlet(alpha) proportions."""
    _check(n_items, n_parts)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    shares = rng.dirichlet(np.full(n_parts, alpha))
    cuts = (np.cumsum(shares)[:-1] * n_items).round().astype(int)
    parts = [list(map(int, c)) for c in np.split(rng.permutation(n_items), cuts)]
    return _fill_empty(parts)


PARTITIONERS = ("iid", "dirichlet", "quantity")


def partition_samples(
    labels: np.ndarray, n_parts: int, *, partition: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Dispatch by name: ``"iid"``, ``"dirichlet"`` (label skew) or ``"quantity"``."""
    rng = np.random.default_rng(seed)
    if partition == "iid":
        return partition_iid(len(labels), n_parts, rng)
    if partition == "dirichlet":
        return partition_dirichlet(labels, n_parts, alpha, rng)
    if partition == "quantity":
        return partition_quantity(len(labels), n_parts, alpha, rng)
    raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(PARTITIONERS)}")


def k_hop_halo(adjacency: np.ndarray, members: np.ndarray, hops: int) -> np.ndarray:
    """Sensors within ``hops`` edges of ``members`` (nonzero ``adjacency``), members excluded."""
    linked = (adjacency != 0) | (adjacency.T != 0)
    reached = np.zeros(adjacency.shape[0], dtype=bool)
    reached[members] = True
    frontier = reached.copy()
    for _ in range(hops):
        frontier = linked[frontier].any(axis=0) & ~reached
        reached |= frontier
    reached[members] = False
    return np.flatnonzero(reached)


@dataclass(frozen=True)
class CloudletPartition:
    """Sensor ownership by cloudlet, training subgraphs and the cloudlet neighbour graph.

    Indices are into the full sensor graph. ``subgraph(c)`` lists own sensors first, then halo.
    """

    owner: np.ndarray  # [N] owning cloudlet, -1 when left out
    members: tuple[np.ndarray, ...]  # own sensors per cloudlet
    halos: tuple[np.ndarray, ...]  # halo sensors per cloudlet (owned by other cloudlets)
    neighbours: tuple[tuple[int, ...], ...]  # cloudlets within communication range
    range_km: float

    @property
    def left_out(self) -> int:
        """Sensors outside every cloudlet's radius (not used by any cloudlet)."""
        return int((self.owner < 0).sum())

    @property
    def covered(self) -> np.ndarray:
        return np.flatnonzero(self.owner >= 0)

    def subgraph(self, cloudlet: int) -> np.ndarray:
        return np.concatenate([self.members[cloudlet], self.halos[cloudlet]])

    def halo_sources(self, cloudlet: int) -> dict[int, int]:
        """{other cloudlet: number of its sensors in this cloudlet's halo}."""
        owners, counts = np.unique(self.owner[self.halos[cloudlet]], return_counts=True)
        return {int(o): int(n) for o, n in zip(owners, counts, strict=True)}

    def halo_mb(self, cloudlet: int, steps: int, bytes_per_value: int = 4) -> float:
        """MB of halo readings this cloudlet receives for ``steps`` time steps (float32)."""
        return len(self.halos[cloudlet]) * steps * bytes_per_value / 1e6


def partition_cloudlets(
    graph: SensorGraph,
    *,
    hops: int = 2,
    range_km: float | None = None,
    adjacency: str = "road",
    kernel_radius_km: float | None = None,
) -> CloudletPartition:
    """Nearest cloudlet within ``graph.radius_km``; halo over the model's adjacency.

    ``adjacency``/``kernel_radius_km`` name the graph (``SensorGraph.adjacency``): the halo is
    taken over the same graph the model convolves over.

    Two cloudlets are neighbours (may talk directly) when their centres are within ``range_km``,
    by default twice the radius, i.e. their coverage disks touch.
    """
    from p2pfl.ml.traffic import haversine_km

    if not graph.cloudlets:
        raise ValueError(f"graph {graph.name!r} has no cloudlets (cloudlets.json)")
    c_lat = np.array([c.lat for c in graph.cloudlets])
    c_lon = np.array([c.lon for c in graph.cloudlets])
    dist = haversine_km(graph.lat[:, None], graph.lon[:, None], c_lat[None, :], c_lon[None, :])
    nearest = dist.argmin(axis=1)
    owner = np.where(dist.min(axis=1) <= graph.radius_km, nearest, -1)
    # Left-out sensors leave the graph too: no cloudlet has their readings.
    covered = owner >= 0
    weights = graph.adjacency(adjacency, kernel_radius_km) * (covered[:, None] & covered[None, :])
    members = tuple(np.flatnonzero(owner == c) for c in range(len(graph.cloudlets)))
    halos = tuple(k_hop_halo(weights, m, hops) for m in members)
    range_km = 2 * graph.radius_km if range_km is None else range_km
    between = haversine_km(c_lat[:, None], c_lon[:, None], c_lat[None, :], c_lon[None, :])
    neighbours = tuple(
        tuple(
            int(j) for j in np.flatnonzero((between[i] <= range_km) & (np.arange(len(c_lat)) != i))
        )
        for i in range(len(c_lat))
    )
    return CloudletPartition(owner, members, halos, neighbours, range_km)
