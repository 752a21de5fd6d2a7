"""Peers find each other with mDNS (or a static address) and connect, inside a private netns."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable

import pytest
import trio
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from p2pfl.daemon.bridge import AsyncioBridge, open_bridge
from p2pfl.daemon.discovery import (
    SERVICE_TYPE,
    Advert,
    DiscoveryError,
    PeerCandidate,
    open_mdns_discovery,
    parse_static_peer,
)
from p2pfl.daemon.drops import DropLog
from p2pfl.daemon.transport import PeerTransport, PeerUp, TransportConfig
from p2pfl.identity import NodeIdentity
from p2pfl.sim.netns import BridgedNetwork, SharedNetwork
from p2pfl.sim.testnode import NodeProcess, identity_for, node_argv
from p2pfl.trust import FederationAuthority, TrustPolicy


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


async def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    with trio.move_on_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 (polls counters)
            await trio.sleep(0.05)
    assert predicate(), f"timed out waiting for {what}"


async def _serve_resets(host: str, accepted: list[str], task_status: trio.TaskStatus[int]) -> None:
    """A TCP listener that accepts every connection and resets it at once (SO_LINGER 0)."""

    async def reset(stream: trio.SocketStream) -> None:
        accepted.append(str(stream.socket.getpeername()))
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    listeners = await trio.open_tcp_listeners(0, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(reset, listeners)


async def _publish(bridge: AsyncioBridge, host: str, adverts: dict[str, dict[str, str]], port: int):
    """Publish raw TXT records (instance name -> properties) at ``host``:``port``."""

    async def register() -> AsyncZeroconf:
        zc = AsyncZeroconf(interfaces=[host], ip_version=IPVersion.V4Only)
        for i, (name, properties) in enumerate(adverts.items()):
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{name}.{SERVICE_TYPE}",
                port=port,
                properties=properties,
                server=f"rogue-{i}.local.",
                addresses=[socket.inet_aton(host)],
            )
            await (await zc.async_register_service(info))
        return zc

    return await bridge.call(register)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["federation", "open"])
async def test_rogue_adverts_next_to_real_nodes_are_counted_and_members_stay_connected(
    shared_net: Callable[[int], SharedNetwork], mode: str
) -> None:
    """A rogue publishes, at an address whose listener resets every TCP connection: a fresh
    key with the federation id, validly self-signed but without a certificate; an unsigned
    old-style advert; and a member's id and key under the rogue's own signature. In federation
    mode nobody dials the rogue; in open mode the self-signed advert is a fair candidate, the
    dials fail and the nodes carry on."""
    net = shared_net(3)
    federation = FederationAuthority.generate()
    if mode == "federation":
        trust = TrustPolicy.federation(federation.public_key)
    else:
        trust = TrustPolicy.open()
    members = [identity_for(0), identity_for(1)]
    rogue, rogue_host = NodeIdentity.generate(), net.addresses[2]
    accepted: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        reset_port = await nursery.start(_serve_resets, rogue_host, accepted)
        fresh = Advert(rogue_host, reset_port, federation.federation_id).properties(
            rogue, [rogue_host], time.time()
        )
        unsigned = {k: fresh[k] for k in ("id", "pk", "port", "v", "fed")}
        posing = dict(fresh, id=members[1].node_id, pk=members[1].public_key.hex())
        rogue_bridge = await stack.enter_async_context(open_bridge("rogue"))
        zc = await _publish(
            rogue_bridge,
            rogue_host,
            {"rogue-fresh": fresh, "rogue-unsigned": unsigned, "rogue-posing": posing},
            reset_port,
        )
        stack.push_async_callback(rogue_bridge.call, zc.async_close)
        certificates = [
            federation.admit(m.public_key, name=f"m{i}", expires_at=time.time() + 3600)
            for i, m in enumerate(members)
        ]
        nodes = [
            await stack.enter_async_context(
                PeerTransport(
                    identity,
                    trust,
                    TransportConfig(host=net.addresses[i], connect_timeout_s=3.0),
                    certificate=certificates[i] if mode == "federation" else None,
                )
            )
            for i, identity in enumerate(members)
        ]
        with trio.fail_after(20):  # each side announces the link when its end is open
            assert await _wait_up(nodes[0], {members[1].node_id}) == {members[1].node_id}
            assert await _wait_up(nodes[1], {members[0].node_id}) == {members[0].node_id}
        drops = nodes[0].drops
        for reason in ("unsigned", "bad_signature"):
            await _until(lambda r=reason: drops.get("discovery", r) >= 1, f"a {reason} drop")
        if mode == "federation":
            await _until(lambda: drops.get("discovery", "missing_certificate") >= 1, "the drop")
            assert drops.peer_totals(rogue.node_id) == {
                "discovery": drops.get("discovery", "missing_certificate")
            }
            await trio.sleep(1.0)  # time for a dial, had any candidate named the rogue
            assert accepted == []
            assert nodes[0].peer_public_key(rogue.node_id) is None
        else:
            await _until(lambda: len(accepted) >= 2, "both nodes knocking at the rogue")
            assert nodes[0].peer_public_key(rogue.node_id) == rogue.public_key
        assert nodes[0].connected_peers() == [members[1].node_id]
        assert nodes[0].peer_public_key(members[1].node_id) == members[1].public_key
        assert nodes[1].connected_peers() == [members[0].node_id]


@pytest.mark.netns
async def test_advert_is_re_signed_and_peers_see_the_newer_one(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    a_id, b_id = identity_for(0), identity_for(1)
    send, receive = trio.open_memory_channel[PeerCandidate](64)
    drops = DropLog()
    async with contextlib.AsyncExitStack() as stack:
        bridge_a = await stack.enter_async_context(open_bridge("a"))
        bridge_b = await stack.enter_async_context(open_bridge("b"))
        await stack.enter_async_context(
            open_mdns_discovery(
                bridge_a,
                a_id,
                Advert(net.addresses[0], 7001),
                trio.open_memory_channel[PeerCandidate](64)[0],
                current_trust=TrustPolicy.open,
                drops=DropLog(),
                refresh_s=0.5,
            )
        )
        b = await stack.enter_async_context(
            open_mdns_discovery(
                bridge_b,
                b_id,
                Advert(net.addresses[1], 7002),
                send,
                current_trust=TrustPolicy.open,
                drops=drops,
            )
        )
        with trio.fail_after(10):
            first = await receive.receive()
            assert (first.node_id, first.host, first.port) == (a_id.node_id, net.addresses[0], 7001)
            seen = b.verifier.newest_issued_ms(a_id.node_id)
            assert seen is not None
            await _until(
                lambda: (b.verifier.newest_issued_ms(a_id.node_id) or 0) > seen,
                "the re-signed advert",
            )
        assert drops.snapshot() == {}


def test_a_candidate_never_rebinds_a_known_node_id_to_another_key() -> None:
    me, peer, other = identity_for(0), identity_for(1), identity_for(2)
    transport = PeerTransport(me, TrustPolicy.open(), TransportConfig(mdns=False))
    transport.add_candidate(PeerCandidate("10.0.0.2", 7000, peer.node_id, peer.public_key))
    transport.add_candidate(PeerCandidate("10.0.0.66", 7000, peer.node_id, other.public_key))
    assert transport.peer_public_key(peer.node_id) == peer.public_key
    assert transport.drops.snapshot() == {"discovery/id_key_mismatch": 1}
    assert transport.drops.peer_totals(peer.node_id) == {"discovery": 1}
    # The member's own key may move it (a newer verified advert, or signaling).
    transport.add_candidate(PeerCandidate("10.0.0.9", 7001, peer.node_id, peer.public_key))
    assert transport._candidates[peer.node_id].host == "10.0.0.9"
