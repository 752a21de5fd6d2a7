"""The daemon's revocation side channel: the driver routes lists to the keeper, which keeps,
stores and spreads only the newest verified one."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from p2pfl.daemon.driver import NodeState, ProtocolDriver
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
        keeper.received("a", {"list": new})
        assert await outbox.take(2) == [("b", new), ("c", new)]
        assert (tmp_path / "revocations.list").read_bytes() == new
        assert transport.rechecks == 1
        keeper.received("b", {"list": old})  # older: ignored, not counted
        keeper.received("b", {"list": new})  # the same: ignored
        keeper.received("c", {"list": new.replace(b"x", b"y")})  # forged
        keeper.received("c", {"list": "not bytes"})
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
    keeper.received("a", {"list": AUTHORITY.revoke({MEMBER: None}, serial=5)})
    reloaded = TrustPolicy.federation(AUTHORITY.public_key)
    reloaded.adopt_revocations(AUTHORITY.revoke({}, serial=3))  # an older configured file
    keeper.use_policy(reloaded)
    assert transport.trust is reloaded
    assert reloaded.revocations is not None and reloaded.revocations.serial == 5


class _Machine:
    def __init__(self) -> None:
        self.config = None
        self.dropped: dict[str, int] = {}


async def test_driver_hands_revocation_messages_to_the_side_channel_not_the_machine() -> None:
    sender = NodeIdentity.from_seed(b"S" * 32)
    received: list[tuple[str, Any]] = []
    ups: list[str] = []
    side = SimpleNamespace(
        kinds=frozenset({REVOCATIONS_KIND}),
        peer_up=ups.append,
        received=lambda peer, body: received.append((peer, body)),
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
        side_channel=side,  # type: ignore[arg-type]
    )
    frame = seal(
        sender,
        kind=REVOCATIONS_KIND,
        body=RevocationsMessage(b"list bytes").to_body(),
        seq=1,
        now=time.time(),
    )
    send, receive = trio.open_memory_channel[Any](10)
    await send.send(PeerUp(sender.node_id))
    await send.send(MessageReceived(sender.node_id, frame))
    await send.aclose()
    await driver._receive_loop(receive)
    assert ups == [sender.node_id]
    assert received == [(sender.node_id, {"list": b"list bytes"})]
    inbox = []
    while True:
        try:
            inbox.append(driver._inbox.receive_nowait())
        except trio.WouldBlock:
            break
    assert [type(e).__name__ for e in inbox] == ["PeerUp"]  # the machine saw no message
