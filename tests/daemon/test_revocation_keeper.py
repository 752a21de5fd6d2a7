"""The daemon's revocation side channel: the driver routes lists to the keeper, which keeps,
stores and spreads only the newest verified one."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from p2pfl.daemon.driver import NodeState, ProtocolDriver, SideChannels
from p2pfl.daemon.drops import DropLog
from p2pfl.daemon.revocations import REVOCATIONS_KIND, RevocationKeeper, RevocationsMessage
from p2pfl.daemon.transport import MessageReceived, PeerUp
from p2pfl.identity import NodeIdentity
from p2pfl.trust import FederationAuthority, TrustPolicy
from p2pfl.wire import EnvelopeVerifier, seal

AUTHORITY = FederationAuthority.from_seed(b"F" * 32)
MEMBER = NodeIdentity.from_seed(b"M" * 32).public_key


class FakeTransport:
    def __init__(self, peers: list[str]) -> None:
        self.trust = TrustPolicy.federation(AUTHORITY.public_key)
        self.peers = peers
        self.rechecks = 0

    def set_trust(self, trust: TrustPolicy) -> None:
        self.trust = trust
        self.rechecks += 1

    def connected_peers(self) -> list[str]:
        return list(self.peers)

    def recheck_trust(self) -> None:
        self.rechecks += 1


class Outbox:
    """What the keeper sent, as it sends it (it stores the list in a worker thread first)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple[str, bytes]](100)

    async def send(self, peer: str, message: RevocationsMessage) -> None:
        await self._send.send((peer, message.data))

    async def take(self, n: int) -> list[tuple[str, bytes]]:
        with trio.fail_after(5):
            return sorted([await self._receive.receive() for _ in range(n)])

    def empty(self) -> bool:
        return self._receive.statistics().current_buffer_used == 0


async def test_newer_list_is_stored_and_spread_to_every_other_peer(tmp_path: Path) -> None:
    transport = FakeTransport(["a", "b", "c"])
    drops = DropLog()
    keeper = RevocationKeeper(transport, tmp_path, drops)
    outbox = Outbox()
    old = AUTHORITY.revoke({MEMBER: None}, serial=1)
    new = AUTHORITY.revoke({MEMBER: "x"}, serial=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run, outbox.send)
        keeper.peer_up("a")  # no list yet: nothing to send
        keeper.received("a", REVOCATIONS_KIND, {"list": new})
        assert await outbox.take(2) == [("b", new), ("c", new)]
        assert (tmp_path / "revocations.list").read_bytes() == new
        assert transport.rechecks == 1
        keeper.received("b", REVOCATIONS_KIND, {"list": old})  # older: ignored, not counted
        keeper.received("b", REVOCATIONS_KIND, {"list": new})  # the same: ignored
        keeper.received("c", REVOCATIONS_KIND, {"list": new.replace(b"x", b"y")})  # forged
        keeper.received("c", REVOCATIONS_KIND, {"list": "not bytes"})
        keeper.peer_up("d")  # a new link gets the current list
        assert await outbox.take(1) == [("d", new)]
        await trio.testing.wait_all_tasks_blocked()
        assert outbox.empty()
        nursery.cancel_scope.cancel()
    assert transport.trust.revocations is not None and transport.trust.revocations.serial == 2
    assert drops.snapshot() == {
        "update/forged_revocations": 1,
        "update/malformed_revocations": 1,
    }


async def test_reloaded_policy_keeps_the_newer_list_learnt_from_peers(tmp_path: Path) -> None:
    transport = FakeTransport(["a"])
    keeper = RevocationKeeper(transport, tmp_path, DropLog())
    keeper.received("a", REVOCATIONS_KIND, {"list": AUTHORITY.revoke({MEMBER: None}, serial=5)})
    reloaded = TrustPolicy.federation(AUTHORITY.public_key)
    reloaded.adopt_revocations(AUTHORITY.revoke({}, serial=3))  # an older configured file
    keeper.use_policy(reloaded)
    assert transport.trust is reloaded
    assert reloaded.revocations is not None and reloaded.revocations.serial == 5


class _Machine:
    def __init__(self) -> None:
        self.config = None
        self.dropped: dict[str, int] = {}


def _recording_channel(kind: str, ups: list[str], received: list[tuple[str, str, Any]]) -> Any:
    return SimpleNamespace(
        kinds=frozenset({kind}),
        peer_up=ups.append,
        received=lambda peer, kind, body: received.append((peer, kind, body)),
    )


async def test_driver_hands_side_messages_to_the_channel_of_their_kind_not_the_machine() -> None:
    sender = NodeIdentity.from_seed(b"S" * 32)
    revocations: list[tuple[str, str, Any]] = []
    live: list[tuple[str, str, Any]] = []
    ups: list[str] = []
    side = SideChannels(
        _recording_channel(REVOCATIONS_KIND, ups, revocations),
        _recording_channel("features.live", ups, live),
    )
    driver = ProtocolDriver(
        _Machine(),  # type: ignore[arg-type]
        identity=NodeIdentity.from_seed(b"D" * 32),
        sink=SimpleNamespace(),  # type: ignore[arg-type]
        trainer=SimpleNamespace(),  # type: ignore[arg-type]
        encode_weights=lambda peer, sd: b"",
        decode_weights=lambda peer, data: {},
        state=NodeState(),
        verifier=EnvelopeVerifier(is_trusted=lambda key: True),
        side_channel=side,
    )
    now = time.time()
    # The kind routes, not the body: a revocation body that looks like a live message and a
    # live-kind body without the "live" key each reach the channel of their envelope's kind.
    frames = [
        seal(sender, kind=REVOCATIONS_KIND, body={"list": b"x", "live": "push"}, seq=1, now=now),
        seal(sender, kind="features.live", body={"list": b"y"}, seq=2, now=now),
    ]
    send, receive = trio.open_memory_channel[Any](10)
    await send.send(PeerUp(sender.node_id))
    for frame in frames:
        await send.send(MessageReceived(sender.node_id, frame))
    await send.aclose()
    await driver._receive_loop(receive)
    assert ups == [sender.node_id, sender.node_id]  # every channel hears of the link
    assert revocations == [(sender.node_id, REVOCATIONS_KIND, {"list": b"x", "live": "push"})]
    assert live == [(sender.node_id, "features.live", {"list": b"y"})]
    inbox = []
    while True:
        try:
            inbox.append(driver._inbox.receive_nowait())
        except trio.WouldBlock:
            break
    assert [type(e).__name__ for e in inbox] == ["PeerUp"]  # the machine saw no message


def test_side_channels_refuse_two_channels_for_one_kind() -> None:
    with pytest.raises(ValueError, match="two side channels"):
        SideChannels(
            _recording_channel(REVOCATIONS_KIND, [], []),
            _recording_channel(REVOCATIONS_KIND, [], []),
        )
