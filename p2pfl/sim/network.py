"""The virtual engine's network: who is linked, how long a message takes, what gets lost.

Model, kept simple on purpose and deterministic for a seed:
- Topology: "full" (every node may reach every other) or "random" (a connected random graph,
  each node with about ``degree`` neighbours: a ring for connectivity plus random chords).
- A message of ``size`` bytes leaves through its sender's uplink, a FIFO at ``bandwidth``:
  transmission starts when the uplink is free and takes ``size / bandwidth``; it arrives one
  ``latency`` later. So a node sending nine models in a round pays for nine transmissions.
- Each message is lost independently with probability ``loss`` (drawn from the network's own
  rng, in send order), or when sender and receiver are in different groups of an active
  partition at sending time, or when the receiver is down at arrival (checked by the engine).
- Partitions split the nodes into ``groups`` contiguous blocks of indices for [start, end).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from p2pfl.sim.scenario import NetworkSpec, PartitionSpec


@dataclass(frozen=True, slots=True)
class Transmission:
    arrival: float
    lost: str | None
    """None if delivered, else why: "loss" or "partition"."""


def build_topology(n: int, topology: str, degree: int, rng: random.Random) -> list[list[int]]:
    """Neighbour lists (sorted, symmetric, no self loops)."""
    if topology == "full" or n - 1 <= degree:
        return [[j for j in range(n) if j != i] for i in range(n)]
    links: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):  # ring: connected whatever the chords
        links[i].add((i + 1) % n)
        links[(i + 1) % n].add(i)
    chords = max(0, (degree - 2) * n // 2)
    for _ in range(chords):
        a, b = rng.randrange(n), rng.randrange(n)
        if a != b:
            links[a].add(b)
            links[b].add(a)
    return [sorted(s) for s in links]


class NetworkModel:
    def __init__(self, spec: NetworkSpec, n_nodes: int, rng: random.Random) -> None:
        self.latency = spec.latency_ms / 1000.0
        self.bandwidth = spec.bandwidth_mbps * 1e6 / 8.0  # bytes per second
        self.loss = spec.loss
        self.partitions: tuple[PartitionSpec, ...] = spec.partitions
        self.n_nodes = n_nodes
        self._rng = rng
        self._uplink_free = [0.0] * n_nodes

    def group(self, node: int, partition: PartitionSpec) -> int:
        return node * partition.groups // self.n_nodes

    def separated(self, a: int, b: int, now: float) -> bool:
        return any(
            p.start <= now < p.end and self.group(a, p) != self.group(b, p) for p in self.partitions
        )

    def transmit(self, src: int, dst: int, size: int, now: float) -> Transmission:
        start = max(now, self._uplink_free[src])
        self._uplink_free[src] = start + size / self.bandwidth
        arrival = self._uplink_free[src] + self.latency
        # Always draw, so a partition does not shift the loss draws of later messages.
        lost = self._rng.random() < self.loss
        if self.separated(src, dst, now):
            return Transmission(arrival, "partition")
        return Transmission(arrival, "loss" if lost else None)
