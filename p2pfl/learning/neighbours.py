"""Which peers a server-free node exchanges models with: all, the topology's links, or by range.

``neighbours`` is one of :data:`NEIGHBOURS`:

- ``"all"``: every live peer (no restriction).
- ``"topology"``: the node's links in a given graph (the simulated network's topology, or the
  node ids a daemon's configuration lists).
- ``"range"``: the nodes whose position is within ``range_km`` of this node's (great-circle
  distance, the same haversine as the cloudlet partition of the graph tasks). The positions of
  a graph task's nodes are its cloudlets (:func:`task_positions`), and its default range is the
  task's own communication range (:func:`task_range_km`: twice the cloudlet radius, 16 km in the
  study, unless the task option ``range_km`` says otherwise), so the virtual engine, the
  processes engine and the daemon all reproduce ``CloudletPartition.neighbours``.

Positions are never taken from the network: a daemon reads its own and its peers' (by node id,
which is bound to the peer's key) from its configuration, like the trust allowlist.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

NEIGHBOURS = ("all", "topology", "range")

Position = tuple[float, float]

_EARTH_RADIUS_KM = 6371.0088  # as p2pfl.ml.traffic (this module does not import torch)


def distance_km(a: Position, b: Position) -> float:
    """Great-circle (haversine) distance, the formula of ``p2pfl.ml.traffic.haversine_km``."""
    p1, p2 = math.radians(a[0]), math.radians(b[0])
    dphi = p2 - p1
    dlmb = math.radians(b[1] - a[1])
    h = math.sin(dphi / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dlmb / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(math.sqrt(min(max(h, 0.0), 1.0)))


def within_range(node: str, positions: Mapping[str, Position], range_km: float) -> frozenset[str]:
    """The nodes other than ``node`` whose position is within ``range_km`` of ``node``'s."""
    here = positions[node]
    return frozenset(
        other
        for other, there in positions.items()
        if other != node and distance_km(here, there) <= range_km
    )


def task_positions(task: Any) -> tuple[Position, ...] | None:
    """The position (lat, lon) of each of a graph task's nodes (its cloudlets); None otherwise."""
    graph = getattr(task, "graph", None)
    cloudlets = getattr(graph, "cloudlets", ())
    if not cloudlets:
        return None
    return tuple((float(c.lat), float(c.lon)) for c in cloudlets)


def task_range_km(task: Any) -> float | None:
    """A graph task's communication range between cloudlet centres; None for other tasks."""
    partition = getattr(task, "partition", None)
    value = getattr(partition, "range_km", None)
    return None if value is None else float(value)


def resolve(
    neighbours: str,
    node: str,
    *,
    links: Collection[str] | None = None,
    positions: Mapping[str, Position] | None = None,
    range_km: float | None = None,
) -> frozenset[str] | None:
    """The neighbour set for ``node`` (None: all live peers).

    Raises ValueError naming what is missing: ``links`` for "topology"; this node's position
    in ``positions`` and ``range_km`` for "range".
    """
    if neighbours == "all":
        return None
    if neighbours == "topology":
        if links is None:
            raise ValueError('neighbours = "topology" needs the node\'s links')
        return frozenset(links) - {node}
    if neighbours == "range":
        if positions is None or node not in positions:
            raise ValueError('neighbours = "range" needs the position of this node')
        if range_km is None:
            raise ValueError('neighbours = "range" needs range_km')
        return within_range(node, positions, range_km)
    raise ValueError(f"neighbours must be one of {', '.join(NEIGHBOURS)}, got {neighbours!r}")
