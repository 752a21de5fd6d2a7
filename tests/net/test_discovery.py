"""Peers find each other with mDNS (or a static address) and connect, inside a private netns."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import trio

from p2pfl.daemon.discovery import DiscoveryError, parse_static_peer
from p2pfl.daemon.transport import PeerTransport, PeerUp, TransportConfig
from p2pfl.sim.netns import BridgedNetwork, SharedNetwork
from p2pfl.sim.testnode import NodeProcess, identity_for, node_argv
from p2pfl.trust import TrustPolicy


async def _wait_up(transport: PeerTransport, expected: set[str]) -> set[str]:
    seen: set[str] = set()
    async for event in transport.events:
        if isinstance(event, PeerUp):
            seen.add(event.peer)
        if seen >= expected:
            return seen
    return seen


@pytest.mark.netns
@pytest.mark.slow
async def test_two_nodes_discover_each_other_via_mdns_and_connect(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    a_id, b_id = identity_for(0), identity_for(1)
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            PeerTransport(a_id, TrustPolicy.open(), TransportConfig(host=net.addresses[0]))
        )
        b = await stack.enter_async_context(
            PeerTransport(b_id, TrustPolicy.open(), TransportConfig(host=net.addresses[1]))
        )
        with trio.fail_after(20):
            assert await _wait_up(a, {b_id.node_id}) == {b_id.node_id}
            assert await _wait_up(b, {a_id.node_id}) == {a_id.node_id}
        assert a.connected_peers() == [b_id.node_id]
        # Exactly one peer connection per pair: only the smaller id offered.
        offerer = a if a.node_id < b.node_id else b
        answerer = b if offerer is a else a
        assert answerer.counters["accepted_sdp-offer"] == 1
        assert offerer.counters["accepted_sdp-offer"] == 0


@pytest.mark.netns
@pytest.mark.parametrize("static_on", ["smaller", "larger"])
async def test_static_peer_connects_without_mdns(
    shared_net: Callable[[int], SharedNetwork], static_on: str
) -> None:
    net = shared_net(2)
    ids = sorted([identity_for(0), identity_for(1)], key=lambda i: i.node_id)
    knows = 0 if static_on == "smaller" else 1
    async with contextlib.AsyncExitStack() as stack:
        other = await stack.enter_async_context(
            PeerTransport(
                ids[1 - knows],
                TrustPolicy.open(),
                TransportConfig(host=net.addresses[1 - knows], mdns=False),
            )
        )
        config = TransportConfig(
            host=net.addresses[knows],
            mdns=False,
            static_peers=(f"{net.addresses[1 - knows]}:{other.signaling_port}",),
        )
        knower = await stack.enter_async_context(
            PeerTransport(ids[knows], TrustPolicy.open(), config)
        )
        with trio.fail_after(15):
            assert await _wait_up(knower, {other.node_id}) == {other.node_id}
            assert await _wait_up(other, {knower.node_id}) == {knower.node_id}
        assert "mdns" not in " ".join(knower.counters)


@pytest.mark.netns
@pytest.mark.slow
async def test_five_node_processes_discover_each_other_via_mdns_across_a_bridge(
    bridged_net: Callable[[int], BridgedNetwork],
) -> None:
    net = bridged_net(5)
    nodes = [NodeProcess(net.command(i, node_argv(i, net.addresses[i])), i) for i in range(5)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        with trio.fail_after(60):
            for node in nodes:
                for other in nodes:
                    if other is not node:
                        await node.wait_for(
                            lambda e, o=other: e["event"] == "up" and e["peer"] == o.node_id
                        )
        for node in nodes:
            assert node.count("up") == 4
            await node.command_line(cmd="quit")
        with trio.fail_after(20):
            for node in nodes:
                await node.wait_for(lambda e: e["event"] == "exited")
    assert [node.events[-1]["code"] for node in nodes] == [0] * 5


@pytest.mark.parametrize("entry", ["10.0.0.1", "10.0.0.1:0", ":7000", "host:port", "h:70000"])
def test_bad_static_peer_entry_says_what_a_good_one_looks_like(entry: str) -> None:
    with pytest.raises(DiscoveryError, match="HOST:PORT"):
        parse_static_peer(entry)
