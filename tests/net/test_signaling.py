"""Signed signaling refuses everything it should before any WebRTC resource exists."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
import trio

from p2pfl.daemon.discovery import PeerCandidate
from p2pfl.daemon.signaling import RateLimiter, SignalingGuard, SignalingRefused, exchange
from p2pfl.daemon.transport import PeerTransport, PeerUp, TransportConfig
from p2pfl.identity import NodeIdentity
from p2pfl.sim.netns import SharedNetwork
from p2pfl.trust import FederationAuthority, TrustPolicy

# A real SDP fragment is not needed to be refused; one that would pass the SDP check is.
SDP = "v=0\r\na=fingerprint:sha-256 AA:BB\r\n"


def _ordered() -> tuple[NodeIdentity, NodeIdentity, NodeIdentity]:
    ids = sorted((NodeIdentity.generate() for _ in range(3)), key=lambda i: i.node_id)
    return ids[0], ids[1], ids[2]


def _guard(identity: NodeIdentity, trust: TrustPolicy | None = None) -> SignalingGuard:
    return SignalingGuard(identity, trust or TrustPolicy.open())


def _refusal(guard: SignalingGuard, frame: bytes, now: float) -> str:
    with pytest.raises(SignalingRefused) as caught:
        guard.check_request(frame, "10.0.0.9", now)
    return caught.value.reason


def test_valid_offer_from_the_smaller_id_is_accepted() -> None:
    small, large, _ = _ordered()
    now = time.time()
    frame, nonce = _guard(small).seal_offer(large.public_key, large.node_id, SDP, 7000, now)
    request = _guard(large).check_request(frame, "10.0.0.9", now)
    assert (request.sender_id, request.sdp, request.port, request.nonce) == (
        small.node_id,
        SDP,
        7000,
        nonce,
    )


def test_tampered_sdp_is_refused_as_a_bad_signature() -> None:
    small, large, _ = _ordered()
    now = time.time()
    frame, _ = _guard(small).seal_offer(large.public_key, large.node_id, SDP, 7000, now)
    tampered = frame.replace(b"AA:BB", b"AA:BC")
    assert tampered != frame
    assert _refusal(_guard(large), tampered, now) == "bad_signature"


def test_offer_signed_for_another_node_is_refused() -> None:
    small, large, other = _ordered()
    now = time.time()
    # small's genuine offer to `large`, replayed by someone at `other`.
    frame, _ = _guard(small).seal_offer(large.public_key, large.node_id, SDP, 7000, now)
    guard = _guard(other)
    assert _refusal(guard, frame, now) == "wrong_recipient"
    assert guard.drops.get("signaling", "wrong_recipient") == 1


def test_stale_offer_is_refused() -> None:
    small, large, _ = _ordered()
    sent = time.time() - 120
    frame, _ = _guard(small).seal_offer(large.public_key, large.node_id, SDP, 7000, sent)
    assert _refusal(_guard(large), frame, time.time()) == "expired"


def test_offer_past_its_expiry_is_refused_even_with_a_fresh_timestamp() -> None:
    small, large, _ = _ordered()
    now = time.time()
    sender = _guard(small)
    sender.ttl_s = 0.5
    frame, _ = sender.seal_offer(large.public_key, large.node_id, SDP, 7000, now)
    assert _refusal(_guard(large), frame, now + 1.0) == "stale"


def test_replayed_offer_is_refused() -> None:
    small, large, _ = _ordered()
    now = time.time()
    frame, _ = _guard(small).seal_offer(large.public_key, large.node_id, SDP, 7000, now)
    guard = _guard(large)
    guard.check_request(frame, "10.0.0.9", now)
    assert _refusal(guard, frame, now + 0.1) == "replay"


def test_offer_from_the_larger_id_is_refused() -> None:
    small, large, _ = _ordered()
    now = time.time()
    frame, _ = _guard(large).seal_offer(small.public_key, small.node_id, SDP, 7000, now)
    assert _refusal(_guard(small), frame, now) == "wrong_role"


def test_offer_without_dtls_fingerprint_is_refused() -> None:
    small, large, _ = _ordered()
    now = time.time()
    frame, _ = _guard(small).seal_offer(large.public_key, large.node_id, "v=0\r\n", 7000, now)
    assert _refusal(_guard(large), frame, now) == "bad_sdp"


def test_key_outside_the_federation_is_refused() -> None:
    small, large, _ = _ordered()
    ours, theirs = FederationAuthority.generate(), FederationAuthority.generate()
    now = time.time()
    foreign_cert = theirs.admit(small.public_key, name="intruder", expires_at=now + 3600)
    sender = SignalingGuard(small, TrustPolicy.open(), certificate=foreign_cert)
    frame, _ = sender.seal_offer(large.public_key, large.node_id, SDP, 7000, now)
    guard = _guard(large, TrustPolicy.federation(ours.public_key))
    assert _refusal(guard, frame, now) == "untrusted_foreign_certificate"


def test_requests_beyond_the_rate_limit_are_refused() -> None:
    _, large, _ = _ordered()
    guard = SignalingGuard(large, TrustPolicy.open(), rate=RateLimiter(rate=1.0, burst=3.0))
    now = time.time()
    reasons = [_refusal(guard, b"junk", now) for _ in range(5)]
    assert reasons[:3] == ["truncated"] * 3
    assert reasons[3:] == ["rate_limited"] * 2
    assert _refusal(guard, b"junk", now + 1.0) == "truncated"  # one token back after 1 s


@pytest.mark.netns
async def test_forged_offers_reach_no_webrtc_and_make_no_connection(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(2)
    small, large, other = _ordered()
    config = TransportConfig(host=net.addresses[1], mdns=False)
    async with PeerTransport(large, TrustPolicy.open(), config) as target:
        port = target.signaling_port
        now = time.time()
        sender = _guard(small)
        genuine, _ = sender.seal_offer(large.public_key, large.node_id, SDP, 7000, now)
        stale, _ = sender.seal_offer(large.public_key, large.node_id, SDP, 7000, now - 120)
        for_other, _ = sender.seal_offer(other.public_key, other.node_id, SDP, 7000, now)
        forged = [genuine.replace(b"AA:BB", b"AA:BC"), stale, for_other]
        for frame in forged:
            with pytest.raises(SignalingRefused) as caught:
                await exchange(net.addresses[1], port, frame, local_address=net.addresses[0])
            assert caught.value.reason == "no_reply"
        assert target.drops.get("signaling", "bad_signature") == 1
        assert target.drops.get("signaling", "expired") == 1
        assert target.drops.get("signaling", "wrong_recipient") == 1
        assert target.counters["peer_connections_created"] == 0
        assert target.connected_peers() == []


@pytest.mark.netns
async def test_node_outside_the_federation_is_refused_and_never_connects(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(3)
    ours, theirs = FederationAuthority.generate(), FederationAuthority.generate()
    a, b, c = _ordered()
    expires = time.time() + 3600
    policy = TrustPolicy.federation(ours.public_key)
    async with contextlib.AsyncExitStack() as stack:
        members = []
        for i, ident in enumerate((a, c)):
            config = TransportConfig(host=net.addresses[i], mdns=False)
            cert = ours.admit(ident.public_key, name=f"m{i}", expires_at=expires)
            members.append(
                await stack.enter_async_context(
                    PeerTransport(ident, policy, config, certificate=cert)
                )
            )
        # The outsider (the middle id) has both members as static peers.
        statics = tuple(f"{net.addresses[i]}:{m.signaling_port}" for i, m in enumerate(members))
        outsider_cert = theirs.admit(b.public_key, name="outsider", expires_at=expires)
        outsider = await stack.enter_async_context(
            PeerTransport(
                b,
                TrustPolicy.federation(theirs.public_key),
                TransportConfig(host=net.addresses[2], mdns=False, static_peers=statics),
                certificate=outsider_cert,
            )
        )
        # The members do find each other (static), proving the set-up works at all.
        members[0].add_candidate(
            PeerCandidate(net.addresses[1], members[1].signaling_port, source="static")
        )
        with trio.fail_after(15):
            async for event in members[0].events:
                if isinstance(event, PeerUp):
                    assert event.peer == c.node_id
                    break
        # Knowing c's id and key (as mDNS would tell), the outsider sends c a real offer.
        outsider.add_candidate(
            PeerCandidate(net.addresses[1], members[1].signaling_port, c.node_id, c.public_key)
        )
        with trio.fail_after(10):
            while not outsider.counters["dial_failed_no_reply"]:  # noqa: ASYNC110 (a counter)
                await trio.sleep(0.1)
        # Invites and the offer were refused by both members; c built a WebRTC peer connection
        # only for a's offer, none for the outsider's.
        assert outsider.connected_peers() == []
        assert members[0].drops.get("signaling", "untrusted_foreign_certificate") >= 1
        assert members[1].drops.get("signaling", "untrusted_foreign_certificate") >= 2
        assert members[1].counters["accepted_sdp-offer"] == 1
        assert members[1].counters["peer_connections_created"] == 1
        assert members[0].connected_peers() == [c.node_id]
        assert members[1].connected_peers() == [a.node_id]


def test_reply_address_is_the_signed_host_not_the_tcp_source() -> None:
    small, large, _ = _ordered()
    now = time.time()
    sender = SignalingGuard(small, TrustPolicy.open(), host="127.0.0.3")
    frame, _ = sender.seal_invite(large.public_key, large.node_id, 7000, now)
    # In a shared loopback namespace the TCP source can be 127.0.0.1, where nobody listens.
    request = _guard(large).check_request(frame, "127.0.0.1", now)
    assert (request.host, request.port) == ("127.0.0.3", 7000)


def test_a_request_without_a_signed_host_falls_back_to_the_tcp_source() -> None:
    small, large, _ = _ordered()
    now = time.time()
    sender = SignalingGuard(small, TrustPolicy.open(), host="0.0.0.0")  # listens everywhere
    frame, _ = sender.seal_invite(large.public_key, large.node_id, 7000, now)
    assert _guard(large).check_request(frame, "10.0.0.9", now).host == "10.0.0.9"


@pytest.mark.parametrize("host", ["http://evil/", "a b", "", "x" * 300, "0.0.0.0"])
def test_a_signed_host_that_is_not_an_address_or_name_is_refused(host: str) -> None:
    small, large, _ = _ordered()
    now = time.time()
    sender = SignalingGuard(small, TrustPolicy.open())
    sender.host = host  # bypass the constructor's normalisation: a peer may send anything
    frame, _ = sender.seal_invite(large.public_key, large.node_id, 7000, now)
    assert _refusal(_guard(large), frame, now) == "malformed_body"


@pytest.mark.netns
async def test_four_nodes_in_one_shared_namespace_all_connect_pairwise(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    # Node i knows only the nodes started before it (static, no mDNS), so every pair is set up
    # by an invite one way and an offer whichever way the ids say: replies and dial-backs must
    # reach 127.0.0.2.. (the signed host), never 127.0.0.1.
    n = 4
    net = shared_net(n)
    ids = [NodeIdentity.generate() for _ in range(n)]
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[PeerTransport] = []
        for i in range(n):
            peers = tuple(f"{net.addresses[j]}:{nodes[j].signaling_port}" for j in range(i))
            config = TransportConfig(host=net.addresses[i], mdns=False, static_peers=peers)
            nodes.append(
                await stack.enter_async_context(PeerTransport(ids[i], TrustPolicy.open(), config))
            )

        async def all_up(node: PeerTransport) -> None:
            seen: set[str] = set()
            async for event in node.events:
                if isinstance(event, PeerUp):
                    seen.add(event.peer)
                if len(seen) == n - 1:
                    return

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(all_up, node)
        for i, node in enumerate(nodes):
            assert node.connected_peers() == sorted(ids[j].node_id for j in range(n) if j != i)
        # Exactly one connection per pair: n*(n-1)/2 offers accepted in all.
        assert sum(node.counters["accepted_sdp-offer"] for node in nodes) == n * (n - 1) // 2
