"""The network model: uplink FIFO timing, loss, partitions, topology."""

from __future__ import annotations

import random

import pytest

from p2pfl.sim.network import NetworkModel, build_topology
from p2pfl.sim.scenario import NetworkSpec, PartitionSpec


def test_uplink_is_a_fifo_at_bandwidth_then_latency() -> None:
    net = NetworkModel(NetworkSpec(latency_ms=10.0, bandwidth_mbps=8.0), 3, random.Random(0))
    # 8 Mbit/s = 1 MB/s: 0.5 MB takes 0.5 s on the wire.
    first = net.transmit(0, 1, 500_000, now=1.0)
    second = net.transmit(0, 2, 500_000, now=1.0)
    other = net.transmit(1, 2, 500_000, now=1.0)
    assert first.arrival == pytest.approx(1.51)
    assert second.arrival == pytest.approx(2.01)  # waited for the first on the same uplink
    assert other.arrival == pytest.approx(1.51)
    assert first.lost is None


def test_loss_rate_matches_the_setting() -> None:
    net = NetworkModel(NetworkSpec(loss=0.1), 2, random.Random(1))
    lost = sum(net.transmit(0, 1, 10, now=0.0).lost == "loss" for _ in range(10_000))
    assert 850 < lost < 1150


def test_partition_separates_groups_only_while_active() -> None:
    spec = NetworkSpec(partitions=(PartitionSpec(start=10.0, end=20.0, groups=2),))
    net = NetworkModel(spec, 4, random.Random(0))
    assert net.transmit(0, 3, 10, now=15.0).lost == "partition"
    assert net.transmit(0, 1, 10, now=15.0).lost is None  # same group
    assert net.transmit(0, 3, 10, now=20.0).lost is None  # healed


def test_random_topology_is_symmetric_connected_and_near_degree() -> None:
    links = build_topology(200, "random", 8, random.Random(0))
    assert all(i not in nb and all(i in links[j] for j in nb) for i, nb in enumerate(links))
    seen, frontier = {0}, [0]
    while frontier:
        frontier = [j for i in frontier for j in links[i] if j not in seen]
        seen.update(frontier)
    assert len(seen) == 200
    assert 7 <= sum(map(len, links)) / 200 <= 9
