"""Hostile input at every signaling step: resets, half-closes, held connections, floods.

Two honest transports are connected first; then an attacker (in the same private namespace, from
its own loopback addresses) goes after one of them. Every test asserts the same three things: the
attacked node is still up, its honest link still carries messages, and the drop counters name
what was refused. A reset is sent for real: SO_LINGER 0, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from p2pfl.daemon.datachannel import LinkDown
from p2pfl.daemon.discovery import PeerCandidate
from p2pfl.daemon.signaling import SignalingGuard, SignalingLimits
from p2pfl.daemon.transport import MessageReceived, PeerTransport, PeerUp, TransportConfig
from p2pfl.identity import NodeIdentity
from p2pfl.sim.netns import SharedNetwork
from p2pfl.sim.testnode import identity_for
from p2pfl.trust import TrustPolicy

pytestmark = pytest.mark.netns


def _identity_below(node_id: str) -> NodeIdentity:
    while (identity := NodeIdentity.generate()).node_id >= node_id:
        pass
    return identity


def _identity_above(node_id: str) -> NodeIdentity:
    while (identity := NodeIdentity.generate()).node_id <= node_id:
        pass
    return identity


def _reset(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _connect(host: str, port: int, source: str) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((host, port))
    return sock


async def _wait_until(condition: Callable[[], bool], what: str, within_s: float = 20) -> None:
    with trio.move_on_after(within_s):
        while not condition():  # noqa: ASYNC110 (counters, not events)
            await trio.sleep(0.05)
        return
    pytest.fail(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def _honest_pair(
    net: SharedNetwork, **target_config: object
) -> AsyncIterator[tuple[PeerTransport, PeerTransport]]:
    """``target`` (attacked, address 0) and ``friend`` (address 1), connected."""
    async with contextlib.AsyncExitStack() as stack:
        config = TransportConfig(host=net.addresses[0], mdns=False, **target_config)  # type: ignore[arg-type]
        target = await stack.enter_async_context(
            PeerTransport(identity_for(0), TrustPolicy.open(), config)
        )
        friend_config = TransportConfig(
            host=net.addresses[1],
            mdns=False,
            static_peers=(f"{net.addresses[0]}:{target.signaling_port}",),
        )
        friend = await stack.enter_async_context(
            PeerTransport(identity_for(1), TrustPolicy.open(), friend_config)
        )
        with trio.fail_after(20):
            for transport in (target, friend):
                assert isinstance(await transport.events.receive(), PeerUp)
        yield target, friend


async def _still_talking(target: PeerTransport, friend: PeerTransport) -> None:
    """The honest link survived: both ways, a message arrives."""
    assert target.connected_peers() == [friend.node_id]
    assert friend.connected_peers() == [target.node_id]
    with trio.fail_after(15):
        await friend.send(target.node_id, b"still there?")
        event = await target.events.receive()
        assert isinstance(event, MessageReceived) and event.data == b"still there?"
        await target.send(friend.node_id, b"yes")
        event = await friend.events.receive()
        assert isinstance(event, MessageReceived) and event.data == b"yes"


async def test_resets_and_half_closes_at_every_signaling_step_leave_the_node_and_its_link_up(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(3)
    attacker = net.addresses[2]
    async with _honest_pair(net) as (target, friend):
        host, port = net.addresses[0], target.signaling_port
        stranger = NodeIdentity.generate()
        invite, _ = SignalingGuard(stranger, TrustPolicy.open()).seal_invite(
            target.identity.public_key, target.node_id, 7000, time.time()
        )
        request = struct.pack(">I", len(invite)) + invite

        async def reset_on_accept() -> None:
            _reset(await _connect(host, port, attacker))

        async def reset_mid_length() -> None:
            sock = await _connect(host, port, attacker)
            await sock.send(request[:2])
            _reset(sock)

        async def reset_mid_frame() -> None:
            sock = await _connect(host, port, attacker)
            await sock.send(request[: len(request) // 2])
            await trio.sleep(0.05)
            _reset(sock)

        async def half_close_mid_frame() -> None:
            sock = await _connect(host, port, attacker)
            await sock.send(request[: len(request) // 2])
            sock.shutdown(socket.SHUT_WR)
            await sock.recv(1)  # the node closes its side
            sock.close()

        async def reset_before_the_answer() -> None:
            sock = await _connect(host, port, attacker)
            await sock.send(request)
            _reset(sock)

        steps: list[Callable[[], Awaitable[None]]] = [
            reset_on_accept,
            reset_mid_length,
            reset_mid_frame,
            half_close_mid_frame,
            reset_before_the_answer,
        ]
        for _ in range(3):
            for step in steps:
                await step()
        drops = target.drops
        await _wait_until(
            lambda: (
                drops.get("signaling", "truncated") >= 3
                and drops.stage_totals().get("signaling", 0) >= 9
            ),
            "the refusals to be counted",
        )
        await _still_talking(target, friend)
        # A reset is counted as such, and nothing escaped as an unexpected error.
        assert drops.get("signaling", "reset") + drops.get("signaling", "truncated") >= 9
        assert not [r for (_, r) in drops.totals if r.startswith("error_")], drops.snapshot()


async def test_a_dial_or_invite_to_a_resetting_listener_is_a_counted_failure_not_a_crash(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(3)
    trap = trio.socket.socket()
    await trap.bind((net.addresses[2], 0))
    trap.listen(64)
    trap_port = trap.getsockname()[1]
    served = 0

    async def resetting_listener() -> None:
        nonlocal served
        while True:
            conn, _ = await trap.accept()
            served += 1
            if served % 2:
                with trio.move_on_after(0.5):
                    await conn.recv(65536)  # read the request, then reset instead of answering
            _reset(conn)

    async with _honest_pair(net) as (target, friend), trio.open_nursery() as nursery:
        nursery.start_soon(resetting_listener)
        larger, smaller = _identity_above(target.node_id), _identity_below(target.node_id)
        for identity in (larger, smaller):  # the target dials a larger id, invites a smaller one
            target.add_candidate(
                PeerCandidate(
                    net.addresses[2], trap_port, identity.node_id, identity.public_key, "mdns"
                )
            )
        target.add_candidate(PeerCandidate(net.addresses[2], trap_port, source="static"))
        counters = target.counters
        await _wait_until(
            lambda: (
                served >= 6
                and sum(n for k, n in counters.items() if k.endswith("_failed_reset")) >= 3
            ),
            "several dials and invites to be reset",
        )
        await _still_talking(target, friend)
        nursery.cancel_scope.cancel()
    trap.close()


async def test_held_connections_are_capped_per_source_and_overall_and_time_out(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    limits = SignalingLimits(max_connections=24, max_per_source=4, read_timeout_s=1.0)
    async with _honest_pair(net, signaling=limits) as (target, friend):
        host, port = net.addresses[0], target.signaling_port
        held: list[trio.socket.SocketType] = []
        # 10 sources x 6 connections, each sending one byte and then nothing (slowloris).
        for source in range(10):
            for _ in range(6):
                sock = trio.socket.socket()
                held.append(sock)
                with contextlib.suppress(OSError):  # refused: reset while or after connecting
                    await sock.bind((f"127.0.9.{source + 1}", 0))
                    await sock.connect((host, port))
                    await sock.send(b"\x00")
        drops = target.drops
        await _wait_until(
            lambda: (
                drops.get("resource", "signaling_source_full") >= 10
                and drops.get("resource", "signaling_connections_full") >= 1
            ),
            "the caps to refuse connections",
        )
        # The held ones cost at most the read deadline: all of them time out.
        await _wait_until(
            lambda: drops.get("signaling", "read_timeout") >= 20, "held connections to time out"
        )
        for sock in held:
            sock.close()
        await _still_talking(target, friend)
        # With the slots free again, an honest newcomer still gets in.
        config = TransportConfig(host="127.0.9.200", mdns=False, static_peers=(f"{host}:{port}",))
        async with PeerTransport(identity_for(2), TrustPolicy.open(), config) as newcomer:
            with trio.fail_after(20):
                assert isinstance(await newcomer.events.receive(), PeerUp)


async def test_offers_from_one_member_on_rotating_sources_are_limited_by_its_id(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    async with _honest_pair(net) as (target, friend):
        host, port = net.addresses[0], target.signaling_port
        member = _identity_below(target.node_id)  # offers go small -> large
        guard = SignalingGuard(member, TrustPolicy.open())
        sdp = "v=0\r\na=fingerprint:sha-256 AA:BB\r\n"
        started = trio.current_time()
        for n in range(400):
            frame, _ = guard.seal_offer(
                target.identity.public_key, target.node_id, sdp, 7000, time.time()
            )
            source = f"127.0.{10 + n // 250}.{n % 250 + 1}"  # a new source every time
            sock = await _connect(host, port, source)
            await sock.send(struct.pack(">I", len(frame)) + frame)
            with trio.move_on_after(2), contextlib.suppress(OSError):
                await sock.recv(65536)
            sock.close()
        drops = target.drops
        assert drops.get("signaling", "member_rate_limited") >= 300, drops.snapshot()
        # The member's bucket: 10 at once, then 2 a second; the honest link is the 1.
        allowed = 1 + 10 + 2 * (trio.current_time() - started) + 1
        assert target.counters["peer_connections_created"] <= allowed, target.counters
        # A half-open link is never announced: a fake SDP opens no data channel.
        assert target.connected_peers() == [friend.node_id]
        await _still_talking(target, friend)


class _FaultyMember(PeerTransport):
    """A member whose WebRTC link is torn down ``after_s`` after signaling, whatever stage the
    connection has reached by then (ICE checks, DTLS handshake, SCTP association, data channel,
    or the middle of a transfer): the fault-injection point is the link's peer connection."""

    after_s = 0.0

    async def _new_link(self, peer: Any) -> Any:
        link = await super()._new_link(peer)
        original = link.create_offer

        async def create_offer_then_fail() -> str:
            sdp = await original()
            loop = asyncio.get_running_loop()
            loop.call_later(self.after_s, lambda: loop.create_task(link._pc.close()))
            return str(sdp)

        link.create_offer = create_offer_then_fail
        return link


@pytest.mark.parametrize("after_s", [0.0, 0.005, 0.02, 0.05, 0.1, 0.3, 1.0])
async def test_a_member_whose_link_dies_at_any_stage_of_ice_dtls_or_the_channel_is_contained(
    shared_net: Callable[[int], SharedNetwork], after_s: float
) -> None:
    net = shared_net(3)
    async with _honest_pair(net) as (target, friend):
        member = _identity_below(target.node_id)  # the smaller id offers: it fails
        config = TransportConfig(
            host=net.addresses[2],
            mdns=False,
            static_peers=(f"{net.addresses[0]}:{target.signaling_port}",),
            reconnect_min_s=5.0,
        )
        rogue = _FaultyMember(member, TrustPolicy.open(), config)
        rogue.after_s = after_s
        async with rogue:
            await _wait_until(
                lambda: target.counters["accepted_sdp-offer"] >= 1, "the rogue's offer"
            )
            if after_s >= 1.0:  # open by then: fail in the middle of a 4 MB transfer
                with contextlib.suppress(Exception):
                    await rogue.send(target.node_id, bytes(4_000_000))
            await trio.sleep(after_s + 0.5)
        # The rogue is gone; whatever stage it died in, the target is whole.
        await _wait_until(lambda: member.node_id not in target.connected_peers(), "rogue down")
        await _still_talking_after_events(target, friend)
        assert not [r for (_, r) in target.drops.totals if r.startswith("error_")], (
            target.drops.snapshot()
        )


async def _still_talking_after_events(target: PeerTransport, friend: PeerTransport) -> None:
    """Like ``_still_talking``, skipping the rogue's PeerUp/PeerDown/messages on the way."""
    assert friend.node_id in target.connected_peers()
    with trio.fail_after(15):
        await friend.send(target.node_id, b"still there?")
        async for event in target.events:
            if isinstance(event, MessageReceived) and event.peer == friend.node_id:
                assert event.data == b"still there?"
                break


async def test_invites_from_many_fresh_keys_are_remembered_within_a_bound(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    async with _honest_pair(net, max_candidates=4) as (target, friend):
        host, port = net.addresses[0], target.signaling_port
        for n in range(12):  # open trust: any key may invite; each one asks to be dialled back
            stranger = NodeIdentity.generate()
            frame, _ = SignalingGuard(stranger, TrustPolicy.open()).seal_invite(
                target.identity.public_key, target.node_id, 7000, time.time()
            )
            sock = await _connect(host, port, f"127.0.11.{n + 1}")
            await sock.send(struct.pack(">I", len(frame)) + frame)
            with trio.move_on_after(2), contextlib.suppress(OSError):
                await sock.recv(65536)
            sock.close()
        assert len(target._candidates) <= 4
        assert friend.node_id in target._candidates  # connected peers are never forgotten
        drops = target.drops  # forgotten, or refused while every one is being dialled
        assert (
            drops.get("resource", "candidate_forgotten") + drops.get("resource", "candidates_full")
            >= 8
        ), drops.snapshot()
        await _still_talking(target, friend)


async def test_an_unfinished_48_mib_transfer_is_freed_and_the_link_keeps_working(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    from p2pfl.daemon.datachannel import FRAME_LIMIT, split_frames

    net = shared_net(2)
    async with _honest_pair(net, transfer_timeout_s=1.0) as (target, friend):
        link = friend._peers[target.node_id].link
        assert link is not None and friend._bridge is not None

        async def send_a_fifth_of_48_mib() -> None:  # on the asyncio side, as the link sends
            frames = split_frames(bytes(48 << 20), FRAME_LIMIT, transfer_id=424242)
            for _ in range(40):  # 10 MiB of the 48 announced, then silence
                link._send(next(frames))
                await asyncio.sleep(0)

        await friend._bridge.call(send_a_fifth_of_48_mib)
        await _wait_until(
            lambda: target.drops.get("link", "incomplete_timeout") == 1,
            "the stalled transfer to be freed",
        )
        await _still_talking(target, friend)


async def test_a_message_whose_last_fragment_never_comes_aborts_that_link_only(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    """A member's SCTP sends fragments of one message, in order, without end (aiortc alone holds
    them all): the target holds a bounded amount, aborts that association, counts why, and
    links again with the member as with any lost link."""
    from aiortc import rtcsctptransport as aiortc_sctp

    from p2pfl.daemon import sctp

    net = shared_net(2)
    async with _honest_pair(net, reconnect_min_s=0.2) as (target, friend):
        link = friend._peers[target.node_id].link
        assert link is not None and friend._bridge is not None and link._channel is not None
        stream_id = link._channel.id
        chunks = 2 * sctp.HOLD_BYTES // 1356  # twice what the target may hold

        async def never_ending() -> None:  # on the asyncio side, below the sender's queue
            transport: Any = link._pc.sctp
            for n in range(chunks):
                chunk = aiortc_sctp.DataChunk(flags=0 if n else aiortc_sctp.SCTP_DATA_FIRST_FRAG)
                chunk.tsn = transport._local_tsn
                transport._local_tsn = aiortc_sctp.tsn_plus_one(transport._local_tsn)
                chunk.stream_id, chunk.stream_seq, chunk.protocol = stream_id, 60000, 53
                chunk.user_data = bytes(1356)
                try:
                    await transport._send_chunk(chunk)
                except ConnectionError:
                    return  # the target aborted the association: the link is down
                if n % 8 == 0:
                    await asyncio.sleep(0.001)  # paced: the test is the bound, not the loss

        await friend._bridge.call(never_ending)
        await _wait_until(
            lambda: target.drops.get("link", "sctp_reassembly_full") == 1,
            "the target to refuse the overrun",
        )
        await _wait_until(
            lambda: (
                target.connected_peers() == [friend.node_id]
                and friend.connected_peers() == [target.node_id]
                and target._peers[friend.node_id].link is not link
            ),
            "the pair to link again",
        )
        while True:  # the link's down and up again
            with trio.move_on_after(0.5):
                await target.events.receive()
                continue
            break
        while True:
            with trio.move_on_after(0.5):
                await friend.events.receive()
                continue
            break
        await _still_talking(target, friend)


async def test_a_link_that_fails_while_the_accepting_side_waits_for_it_to_open_is_counted() -> None:
    """The accepting side waits for the channel in a nursery (raced against the peer going
    down); a LinkDown raised there arrives wrapped in an exception group. It once ended the
    scope as an unclassified error (``signaling/error_ExceptionGroup``, a full-suite run of the
    test above, rogue failing 0.05 s after its offer) instead of being counted as a failed
    accept."""
    closed: list[object] = []

    async def call(fn: Any, *args: Any) -> Any:
        return await fn(*args)

    async def wait_open() -> None:
        raise LinkDown("closed")

    async def close_link(peer: Any) -> None:
        closed.append(peer)

    async def run_peer(peer: Any) -> None:
        raise AssertionError("a link that never opened is not run")

    peer = SimpleNamespace(link=SimpleNamespace(wait_open=wait_open), down=trio.Event())
    transport = SimpleNamespace(
        _bridge=SimpleNamespace(call=call),
        config=SimpleNamespace(connect_timeout_s=5.0),
        counters=Counter(),
        _stop_when_down=PeerTransport._stop_when_down,
        _release_accept=lambda peer: None,
        _close_link=close_link,
        _run_peer=run_peer,
    )
    await PeerTransport._finish_accept(transport, peer)  # type: ignore[arg-type]
    assert transport.counters == {"accept_failed_LinkDown": 1}
    assert closed == [peer]
