"""Messages over real data channels between nodes inside a private namespace."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from p2pfl.daemon.bridge import open_bridge
from p2pfl.daemon.datachannel import LinkSettings, RtcLink
from p2pfl.daemon.transport import (
    MessageReceived,
    PeerDown,
    PeerTransport,
    PeerUnavailable,
    PeerUp,
    SendQueueFull,
    TransportConfig,
)
from p2pfl.sim.netns import SharedNetwork
from p2pfl.sim.testnode import NodeProcess, identity_for, node_argv
from p2pfl.trust import FederationAuthority, TrustPolicy


@contextlib.asynccontextmanager
async def _connected_pair(
    net: SharedNetwork, send_queue: int = 64
) -> AsyncIterator[tuple[PeerTransport, PeerTransport]]:
    """Two in-process transports joined by a static peer entry (no mDNS wait)."""
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            PeerTransport(
                identity_for(0),
                TrustPolicy.open(),
                TransportConfig(host=net.addresses[0], mdns=False, send_queue=send_queue),
            )
        )
        config = TransportConfig(
            host=net.addresses[1],
            mdns=False,
            static_peers=(f"{net.addresses[0]}:{a.signaling_port}",),
        )
        b = await stack.enter_async_context(
            PeerTransport(identity_for(1), TrustPolicy.open(), config)
        )
        with trio.fail_after(15):
            for transport in (a, b):
                event = await transport.events.receive()
                assert isinstance(event, PeerUp)
        yield a, b


@pytest.mark.netns
async def test_many_small_messages_keep_their_order(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    count = 1500
    async with _connected_pair(net) as (a, b):
        received: list[bytes] = []

        async def collect() -> None:
            async for event in b.events:
                assert isinstance(event, MessageReceived)
                assert event.peer == a.node_id
                received.append(event.data)
                if len(received) == count:
                    return

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                for i in range(count):
                    await a.send(b.node_id, i.to_bytes(4, "big") * (1 + i % 50))
        assert [int.from_bytes(m[:4], "big") for m in received] == list(range(count))
        assert all(len(m) == 4 * (1 + i % 50) for i, m in enumerate(received))


@pytest.mark.netns
async def test_send_to_an_unknown_peer_raises_peer_unavailable(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(1)
    config = TransportConfig(host=net.addresses[0], mdns=False)
    async with PeerTransport(identity_for(0), TrustPolicy.open(), config) as transport:
        with pytest.raises(PeerUnavailable, match="not connected"):
            await transport.send(identity_for(1).node_id, b"hello")


@pytest.mark.netns
async def test_clean_shutdown_is_seen_as_peer_down_before_any_heartbeat_timeout(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    async with contextlib.AsyncExitStack() as outer:
        b = await outer.enter_async_context(
            PeerTransport(
                identity_for(1),
                TrustPolicy.open(),
                TransportConfig(host=net.addresses[1], mdns=False, peer_timeout_s=30),
            )
        )
        config = TransportConfig(
            host=net.addresses[0],
            mdns=False,
            static_peers=(f"{net.addresses[1]}:{b.signaling_port}",),
            peer_timeout_s=30,
        )
        async with PeerTransport(identity_for(0), TrustPolicy.open(), config) as a:
            with trio.fail_after(15):
                assert isinstance(await a.events.receive(), PeerUp)
                assert isinstance(await b.events.receive(), PeerUp)
        closed = time.monotonic()
        with trio.fail_after(10):
            event = await b.events.receive()
        assert isinstance(event, PeerDown)
        assert event.peer == identity_for(0).node_id
        assert event.reason != "heartbeat_timeout"
        assert time.monotonic() - closed < 5
        assert b.connected_peers() == []


@pytest.mark.netns
@pytest.mark.slow
async def test_50_mb_signed_payload_arrives_intact_between_node_processes(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    sender = NodeProcess(net.command(node_argv(0, net.addresses[0], "--no-mdns")), 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        with trio.fail_after(20):
            ready = await sender.wait_for(lambda e: e["event"] == "ready")
        static = f"{net.addresses[0]}:{ready['port']}"
        receiver = NodeProcess(
            net.command(
                node_argv(1, net.addresses[1], "--no-mdns", "--verify", "--static", static)
            ),
            1,
        )
        await nursery.start(receiver.run)
        with trio.fail_after(30):
            await sender.wait_for(lambda e: e["event"] == "up")
        await sender.command_line(
            cmd="send", peer=receiver.node_id, size=50_000_000, seed=7, signed=True
        )
        with trio.fail_after(120):
            got = await receiver.wait_for(lambda e: e["event"] == "message")
            sent = await sender.wait_for(lambda e: e["event"] == "sent")
        assert got["peer"] == sender.node_id
        assert got["size"] == sent["size"] > 50_000_000
        assert got["sha256"] == sent["sha256"]
        assert got["verified"] is True
        nursery.cancel_scope.cancel()


@pytest.mark.netns
async def test_link_uses_only_our_ice_servers_and_gathers_host_candidates_only(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    shared_net(1)
    async with open_bridge() as bridge:

        async def offer() -> tuple[list[object], str]:
            link = RtcLink(LinkSettings(), on_message=print, on_down=lambda _r: None, on_drop=print)
            try:
                configuration = link._pc._RTCPeerConnection__configuration  # type: ignore[attr-defined]
                return list(configuration.iceServers), await link.create_offer()
            finally:
                await link.close()

        with trio.fail_after(5):
            servers, sdp = await bridge.call(offer)
    assert servers == []  # never aiortc's default public STUN server
    candidates = [line for line in sdp.splitlines() if line.startswith("a=candidate")]
    assert candidates
    assert all(" typ host" in line for line in candidates)
    assert all(" 127.0.0.1 " not in line for line in candidates)  # aioice skips it; aliases used


@pytest.mark.netns
async def test_sends_beyond_the_per_peer_queue_bound_are_refused(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    async with _connected_pair(net, send_queue=2) as (a, b):
        outcomes: list[str] = []

        async def send_one() -> None:
            try:
                await a.send(b.node_id, bytes(300_000))
                outcomes.append("sent")
            except SendQueueFull:
                outcomes.append("full")

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(send_one)
        assert sorted(outcomes) == ["full", "full", "full", "sent", "sent"]
        assert a.counters["send_queue_full"] == 3


@pytest.mark.netns
async def test_peer_info_names_the_federation_member_and_measures_rtt_from_heartbeats(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    authority = FederationAuthority.generate()
    policy = TrustPolicy.federation(authority.public_key)
    ids = [identity_for(0), identity_for(1)]
    certs = [
        authority.admit(ident.public_key, name=f"edge-{i}", expires_at=time.time() + 3600)
        for i, ident in enumerate(ids)
    ]
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            PeerTransport(
                ids[0],
                policy,
                TransportConfig(host=net.addresses[0], mdns=False, heartbeat_interval_s=0.1),
                certificate=certs[0],
            )
        )
        config = TransportConfig(
            host=net.addresses[1],
            mdns=False,
            heartbeat_interval_s=0.1,
            static_peers=(f"{net.addresses[0]}:{a.signaling_port}",),
        )
        b = await stack.enter_async_context(
            PeerTransport(ids[1], policy, config, certificate=certs[1])
        )
        with trio.fail_after(15):
            for transport in (a, b):
                assert isinstance(await transport.events.receive(), PeerUp)
        assert a.peer_info("0" * 64) is None
        with trio.fail_after(5):
            while (info := a.peer_info(b.node_id)) is None or info.rtt_s is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        before = info.bytes_out
        await a.send(b.node_id, b"x" * 1000)
        assert isinstance(await b.events.receive(), MessageReceived)
        after_a, seen_by_b = a.peer_info(b.node_id), b.peer_info(a.node_id)
    assert info.name == "edge-1" and info.state == "connected"
    assert seen_by_b is not None and seen_by_b.name == "edge-0"
    # The selected ICE pair: host candidates on the namespace's loopback (ICE gathers every
    # 127.0.0.x the namespace has, so which one it picked is ICE's choice), with a port.
    assert info.ice_path == "host" and seen_by_b.ice_path == "host"
    for address in (info.address, seen_by_b.address):
        assert address is not None and re.fullmatch(r"127\.0\.0\.\d+:\d+", address), address
    # Loopback: a round trip well under a heartbeat interval, and never zero or negative.
    assert info.rtt_s is not None and 0 < info.rtt_s < 0.1
    assert after_a is not None and after_a.bytes_out >= before + 1000
    assert seen_by_b.bytes_in >= 1000 and seen_by_b.last_seen is not None
    assert abs(seen_by_b.last_seen - time.time()) < 5


@pytest.mark.netns
async def test_a_dial_cancelled_while_gathering_leaves_no_socket_open(
    shared_net: Callable[[int], SharedNetwork], monkeypatch: pytest.MonkeyPatch
) -> None:
    """aioice opens a link's host sockets one address at a time and hands them to its
    connection only after the last: a dial cancelled in between (its connect timeout) used to
    leave the sockets already open to nobody. The link closes every socket its gathering
    opened."""
    from aioice import ice

    net = shared_net(1)
    address = net.addresses[0]
    monkeypatch.setattr(ice, "get_host_addresses", lambda **_: [address, address])
    opened: list[asyncio.BaseTransport] = []
    made = ice.StunProtocol.connection_made

    async with open_bridge() as bridge:

        async def cancelled_offer() -> list[bool]:
            link = RtcLink(LinkSettings(), on_message=print, on_down=lambda _r: None, on_drop=print)
            offer = asyncio.ensure_future(link.create_offer())

            def connection_made(protocol: Any, transport: Any) -> None:
                made(protocol, transport)
                opened.append(transport)
                if len(opened) == 1:  # the first socket is open; cancel before the second
                    offer.cancel()

            monkeypatch.setattr(ice.StunProtocol, "connection_made", connection_made)
            with contextlib.suppress(asyncio.CancelledError):
                await offer
            assert opened and not all(t.is_closing() for t in opened)  # open, aioice forgot it
            await link.close()
            return [t.is_closing() for t in opened]

        with trio.fail_after(10):
            closing = await bridge.call(cancelled_offer)
    assert closing and all(closing)
