"""Trust on live links: a link closes when its peer's certificate expires or it is revoked."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from p2pfl.daemon.transport import PeerDown, PeerTransport, PeerUp, TransportConfig
from p2pfl.sim.netns import SharedNetwork
from p2pfl.sim.testnode import identity_for
from p2pfl.trust import FederationAuthority, TrustPolicy

HOUR = 3600.0


@contextlib.asynccontextmanager
async def _federated_pair(
    net: SharedNetwork, authority: FederationAuthority, b_expires_at: float
) -> AsyncIterator[tuple[PeerTransport, PeerTransport]]:
    """Two members of one federation, joined by a static peer entry; b's certificate expires
    at ``b_expires_at``."""
    now = time.time()
    a_id, b_id = identity_for(0), identity_for(1)
    cert_a = authority.admit(a_id.public_key, name="a", expires_at=now + HOUR, issued_at=now)
    cert_b = authority.admit(b_id.public_key, name="b", expires_at=b_expires_at, issued_at=now)
    fast = TransportConfig(mdns=False, reconnect_min_s=0.2, reconnect_max_s=0.5)
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            PeerTransport(
                a_id,
                TrustPolicy.federation(authority.public_key),
                dataclasses.replace(fast, host=net.addresses[0]),
                certificate=cert_a,
            )
        )
        config = dataclasses.replace(
            fast, host=net.addresses[1], static_peers=(f"{net.addresses[0]}:{a.signaling_port}",)
        )
        b = await stack.enter_async_context(
            PeerTransport(
                b_id, TrustPolicy.federation(authority.public_key), config, certificate=cert_b
            )
        )
        with trio.fail_after(15):
            for transport in (a, b):
                assert isinstance(await transport.events.receive(), PeerUp)
        yield a, b


async def _next_down(transport: PeerTransport, within: float) -> PeerDown:
    with trio.fail_after(within):
        while True:
            event = await transport.events.receive()
            if isinstance(event, PeerDown):
                return event


async def _wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    with trio.move_on_after(within):
        while not condition():  # noqa: ASYNC110 (a counter, not an event)
            await trio.sleep(0.05)
        return
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.netns
async def test_live_link_closes_at_the_peer_certificate_expiry(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    authority = FederationAuthority.generate()
    expires_at = time.time() + 4.0
    async with _federated_pair(net, authority, expires_at) as (a, b):
        assert a.connected_peers() == [b.node_id]
        down = await _next_down(a, within=expires_at - time.time() + 5)
        closed_at = time.time()
        assert down.peer == b.node_id and down.reason == "trust_certificate_expired"
        # At the expiry (a timer), not before it and not a polling interval later.
        assert expires_at <= closed_at < expires_at + 1.5
        assert a.drops.get("trust", "certificate_expired") == 1
        assert a.drops.peer_totals(b.node_id).get("trust") == 1
        # b sees the link go, and its reconnects are refused at signaling from now on.
        assert (await _next_down(b, within=10)).peer == a.node_id
        refused = ("signaling", "untrusted_expired_certificate")
        await _wait_until(lambda: a.drops.get(*refused) >= 2, 15, "refused reconnects")
        assert a.connected_peers() == [] and b.connected_peers() == []


@pytest.mark.netns
async def test_live_link_to_a_revoked_member_closes_when_the_list_is_adopted(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    authority = FederationAuthority.generate()
    async with _federated_pair(net, authority, time.time() + HOUR) as (a, b):
        revocations = authority.revoke({b.identity.public_key: "test"}, serial=1)
        assert a.trust.adopt_revocations(revocations) is not None
        started = time.monotonic()
        a.recheck_trust()
        down = await _next_down(a, within=5)
        assert down.peer == b.node_id and down.reason == "trust_revoked"
        assert time.monotonic() - started < 2
        assert a.drops.get("trust", "revoked") == 1
        refused = ("signaling", "untrusted_revoked")
        await _wait_until(lambda: a.drops.get(*refused) >= 1, 15, "refused reconnects")
        assert a.connected_peers() == []
