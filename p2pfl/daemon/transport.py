"""PeerTransport: what the daemon sees of the network (trio side).

``async with PeerTransport(identity, trust, config) as transport:`` starts, in one nursery: the
asyncio bridge (aiortc + AsyncZeroconf), the signaling listener, the mDNS advert and browser,
and a dial loop. Events arrive on ``transport.events``: ``PeerUp(peer)``,
``MessageReceived(peer, data)``, ``PeerDown(peer, reason)`` (peer = node id). For each peer,
PeerUp comes before its messages and PeerDown after them.

``await transport.send(peer, data)`` frames ``data`` over the peer's data channel and returns
once the last frame has been handed to the channel (waiting on bufferedAmount on the way).
Sends to one peer are delivered in call order. It raises ``PeerUnavailable`` when the peer is not
connected or drops during the send, and ``SendQueueFull`` when ``send_queue`` sends to that peer
are already waiting.

Connections: one RTCPeerConnection with one reliable ordered data channel per pair; the node with
the smaller id offers (the larger one sends a signed ``invite`` so the smaller dials it, which
also makes one-sided static peers work). Every connect has a deadline (``connect_timeout_s``).
Heartbeats run on the data channel; a peer silent for ``peer_timeout_s`` (default 6 s) or whose
connection fails is PeerDown, and the dial loop reconnects with exponential backoff while the
peer is still a candidate. On exit every connection is closed and the mDNS goodbye is sent.

Trust holds for the life of a link, not only at signaling: the transport keeps the certificate
each peer proved there and closes the link (``PeerDown(peer, "trust_<reason>")``, counted in
``drops`` as stage ``trust``) the moment the policy stops accepting it: at the certificate's
expiry (a timer at the soonest expiry of all links), and whenever the policy changes
(``set_trust``, ``recheck_trust``: a reload, a newer revocation list). Reconnects are then
refused at signaling like any other untrusted peer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import trio

from p2pfl.daemon._sctp_limits import SACK_EVERY
from p2pfl.daemon.bridge import AsyncioBridge, BridgeClosed, open_bridge
from p2pfl.daemon.datachannel import FRAME_LIMIT, LinkDown, LinkSettings, RtcLink
from p2pfl.daemon.discovery import Advert, PeerCandidate, open_mdns_discovery, parse_static_peer
from p2pfl.daemon.drops import DropLog, contained
from p2pfl.daemon.limits import DescriptorBudget
from p2pfl.daemon.signaling import (
    SignalingGuard,
    SignalingLimits,
    SignalingRefused,
    SignalingRequest,
    exchange,
    serve_signaling,
)
from p2pfl.identity import NodeIdentity
from p2pfl.trust import TrustError, TrustPolicy

__all__ = [
    "MessageReceived",
    "PeerDown",
    "PeerInfo",
    "PeerTransport",
    "PeerUnavailable",
    "PeerUp",
    "SendQueueFull",
    "TransportConfig",
    "TransportEvent",
]

logger = logging.getLogger(__name__)

# TrustError reasons -> the reason a live link closed for trust is counted under.
_TRUST_DROP_REASONS = {"expired_certificate": "certificate_expired"}
_TRUST_RECHECK_S = 3600.0


@dataclass(frozen=True, slots=True)
class PeerUp:
    peer: str


@dataclass(frozen=True, slots=True)
class PeerDown:
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    peer: str
    data: bytes


TransportEvent = PeerUp | PeerDown | MessageReceived


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What ``PeerTransport.peer_info`` knows of one peer right now."""

    name: str | None  # federation member name (allowlist entry or certificate); None: open trust
    rtt_s: float | None  # smoothed heartbeat round trip; None until the first echo
    bytes_in: int  # data-channel bytes of the current connection, framing and heartbeats included
    bytes_out: int
    last_seen: float | None  # Unix time of the last frame from the peer
    state: str  # "connected" or "connecting"
    ice_path: str | None = None  # "host", "server reflexive" or "relayed" (the selected pair)
    address: str | None = None  # the peer's end of the selected ICE pair, "ip:port"


class PeerUnavailable(ConnectionError):
    """The peer is not connected (or went down during the send)."""


class SendQueueFull(PeerUnavailable):
    """Too many sends to this peer are already waiting; try later or drop the message."""


@dataclass(frozen=True, slots=True)
class TransportConfig:
    host: str = "0.0.0.0"  # signaling bind + advertised address; a 127.0.0.x alias in tests
    signaling_port: int = 0  # 0: any free port (read transport.signaling_port)
    mdns: bool = True
    static_peers: tuple[str, ...] = ()  # "host:port" of peers' signaling listeners
    ice_servers: tuple[str, ...] = ()  # our own STUN/TURN URLs only; empty: none
    turn_username: str | None = None  # credentials for the turn:/turns: URL
    turn_credential: str | None = field(default=None, repr=False)
    relay_only: bool = False  # ICE transport policy "relay": every link goes through TURN
    frame_bytes: int = FRAME_LIMIT
    path_mtu: int = 1500  # largest IP packet between the nodes (sizes SCTP's DATA chunks)
    sack_every: int = SACK_EVERY  # data packets per SCTP SACK
    buffered_high: int = 4 * 1024 * 1024
    buffered_low: int = 1024 * 1024
    send_queue: int = 64
    heartbeat_interval_s: float = 1.0
    peer_timeout_s: float = 6.0
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 8.0
    max_message_bytes: int = 80 * 1024 * 1024
    transfer_timeout_s: float = 30.0  # an incomplete transfer with no new frame this long is freed
    event_buffer: int = 4096
    signaling: SignalingLimits = field(default_factory=SignalingLimits)
    max_pending_links: int = 32  # half-open WebRTC links (dials and accepted offers) at once
    max_candidates: int = 1024  # peers whose whereabouts are remembered (and dialled)
    shed_fraction: float = 0.9  # refuse new remote work above this share of RLIMIT_NOFILE

    def link_settings(self) -> LinkSettings:
        return LinkSettings(
            ice_servers=self.ice_servers,
            turn_username=self.turn_username,
            turn_credential=self.turn_credential,
            relay_only=self.relay_only,
            frame_bytes=self.frame_bytes,
            path_mtu=self.path_mtu,
            sack_every=self.sack_every,
            buffered_high=self.buffered_high,
            buffered_low=self.buffered_low,
            heartbeat_interval_s=self.heartbeat_interval_s,
            peer_timeout_s=self.peer_timeout_s,
            max_message_bytes=self.max_message_bytes,
            transfer_timeout_s=self.transfer_timeout_s,
        )


@dataclass(eq=False)
class _Peer:
    """One connection attempt / connection to one peer (trio side)."""

    node_id: str
    transport: PeerTransport
    link: RtcLink | None = None
    down: trio.Event = field(default_factory=trio.Event)
    reason: str = ""
    announced: bool = False
    finished: bool = False
    early: list[bytes] = field(default_factory=list)
    lock: trio.Lock = field(default_factory=trio.Lock)
    waiting: int = 0

    def on_message(self, data: bytes) -> None:
        if self.finished:
            return
        if not self.announced:
            self.early.append(data)
        else:
            self.transport._emit(MessageReceived(self.node_id, data))

    def on_down(self, reason: str) -> None:
        if not self.down.is_set():
            self.reason = reason
            self.down.set()


@dataclass
class _Retry:
    at: float = 0.0
    delay: float = 0.0


class LinkPolicy(Protocol):
    """Which links to hold ([limits] max_peers: ``p2pfl.daemon.sampling.SampledLinks``). An offer
    or invite is the policy's neighbour request: it carries ``priority(peer)``, the receiver's
    ``accept`` admits it (else no reply), and a request that gets no link is ``failed``."""

    def dial(self, peer: str) -> bool: ...
    def priority(self, peer: str) -> bool: ...
    def accept(self, peer: str, priority: bool) -> bool: ...
    def failed(self, peer: str) -> None: ...


class PeerTransport:
    """Signed-signaling WebRTC transport to every trusted peer found (see module docstring)."""

    def __init__(
        self,
        identity: NodeIdentity,
        trust: TrustPolicy,
        config: TransportConfig | None = None,
        *,
        certificate: bytes | None = None,
        drops: DropLog | None = None,
        link_policy: LinkPolicy | None = None,
    ) -> None:
        self.identity = identity
        self.drops = drops if drops is not None else DropLog()
        self.node_id = identity.node_id
        self.config = config or TransportConfig()
        self.counters: Counter[str] = Counter()
        self.guard = SignalingGuard(
            identity,
            trust,
            certificate=certificate,
            host=self.config.host,
            counters=self.counters,
            drops=self.drops,
        )
        self.budget = DescriptorBudget(self.config.shed_fraction)
        self._accepting: dict[str, _Peer] = {}  # accepted offers whose link is not open yet
        self._trust = trust
        self._event_send, self.events = trio.open_memory_channel[TransportEvent](
            self.config.event_buffer
        )
        self._peers: dict[str, _Peer] = {}  # announced (up) peers
        self._pending: set[str] = set()  # peers with a dial or accept in progress
        self._candidates: dict[str, PeerCandidate] = {}
        self._names: dict[str, str] = {}  # member names proven in signaling
        self._proofs: dict[str, tuple[bytes, bytes | None]] = {}  # peer -> (key, certificate)
        self._trust_changed = trio.Event()
        self._static = [parse_static_peer(entry) for entry in self.config.static_peers]
        self._retry: dict[str, _Retry] = {}
        self.link_policy = link_policy
        """[limits] max_peers: which members to dial and whose offers to accept (None: all)."""
        self._wake = trio.Event()
        self._bridge: AsyncioBridge | None = None
        self._nursery: trio.Nursery | None = None
        self._stack = contextlib.AsyncExitStack()
        self.signaling_port = 0
        # Signaling connections leave from our own address, and every request names it (signed):
        # peers reply and dial back there, never to the TCP source (127.0.0.1 in a shared
        # loopback namespace, another interface on a multi-homed host).
        host = self.config.host
        self._local_address = None if host in ("", "0.0.0.0") else host

    # --- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> PeerTransport:
        stack = self._stack
        await stack.__aenter__()
        try:
            self._bridge = await stack.enter_async_context(open_bridge(f"p2pfl-{self.node_id[:8]}"))
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(self._nursery.cancel_scope.cancel)
            cfg = self.config
            self.signaling_port = await self._nursery.start(
                functools.partial(
                    serve_signaling,
                    self.guard,
                    self._on_request,
                    cfg.host,
                    cfg.signaling_port,
                    limits=cfg.signaling,
                    budget=self.budget,
                )
            )
            if cfg.mdns:
                send, receive = trio.open_memory_channel[PeerCandidate](256)
                advert = Advert(
                    host=cfg.host,
                    signaling_port=self.signaling_port,
                    federation_id=self._trust.federation_id,
                    certificate=self.guard.certificate,
                )
                await stack.enter_async_context(
                    open_mdns_discovery(
                        self._bridge,
                        self.identity,
                        advert,
                        send,
                        current_trust=lambda: self.guard.trust,  # SIGHUP replaces it
                        drops=self.drops,
                    )
                )
                self._nursery.start_soon(self._consume_candidates, receive)
            self._nursery.start_soon(self._dial_loop)
            self._nursery.start_soon(self._watch_trust)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._event_send.close()

    # --- public API -----------------------------------------------------------------------------
    def connected_peers(self) -> list[str]:
        return sorted(self._peers)

    def linked_peers(self) -> list[str]:
        """Members with a link up or being set up."""
        return sorted(self._peers.keys() | (self._pending & self._candidates.keys()))

    def known_members(self) -> list[str]:
        """Members whose address a signed advert or signaling request told us (discovery)."""
        return sorted(self._candidates)

    def sending(self, peer: str) -> bool:
        """Whether a message to ``peer`` is being sent or waits to be."""
        target = self._peers.get(peer)
        return target is not None and (target.waiting > 0 or target.lock.locked())

    def wake(self) -> None:
        """Look at the candidates again now (the link policy changed)."""
        self._wake.set()

    def _wants(self, peer: str) -> bool:
        return self.link_policy is None or self.link_policy.dial(peer)

    def _priority(self, peer: str | None) -> bool:
        return self.link_policy is not None and peer is not None and self.link_policy.priority(peer)

    def _failed(self, peer: str | None) -> None:
        if self.link_policy is not None and peer is not None:
            self.link_policy.failed(peer)

    def peer_public_key(self, peer: str) -> bytes | None:
        """The Ed25519 key that signed this peer's signaling (None if never seen)."""
        candidate = self._candidates.get(peer)
        return None if candidate is None else candidate.public_key

    def peer_info(self, peer: str) -> PeerInfo | None:
        """Name, RTT, traffic and state of ``peer``; None when neither connected nor connecting.

        Reads the link's counters directly (plain attributes the asyncio thread writes), so it
        is cheap enough for every ``status`` request.
        """
        name = self._names.get(peer)
        up = self._peers.get(peer)
        link = None if up is None else up.link
        if link is not None:
            return PeerInfo(
                name,
                link.rtt_s,
                link.bytes_in,
                link.bytes_out,
                link.last_seen,
                "connected",
                link.ice_path,
                link.remote_address,
            )
        if peer in self._pending:
            return PeerInfo(name, None, 0, 0, None, "connecting")
        return None

    def add_candidate(self, candidate: PeerCandidate) -> None:
        """Tell the transport where a peer may be (static peers with no id are invited).

        A candidate with an id must come from a check that its key signed the address (a
        verified mDNS advert, signaling). It never replaces the key recorded for that id.
        """
        if candidate.node_id is None:
            self._static.append(candidate)
        elif candidate.node_id != self.node_id:
            known = self._candidates.get(candidate.node_id)
            if known is not None and known.public_key not in (None, candidate.public_key):
                self.drops.count("discovery", "id_key_mismatch", candidate.node_id)
                return
            self._remember_candidate(candidate)
        self._wake.set()

    async def send(self, peer: str, data: bytes) -> None:
        """Send one message; returns when its last frame is handed to the data channel."""
        if len(data) > self.config.max_message_bytes:
            raise ValueError(
                f"message of {len(data)} bytes exceeds max_message_bytes "
                f"{self.config.max_message_bytes}"
            )
        target = self._peers.get(peer)
        if target is None or target.down.is_set() or target.link is None or self._bridge is None:
            raise PeerUnavailable(f"peer {peer[:8]} is not connected")
        if target.waiting >= self.config.send_queue:
            self.counters["send_queue_full"] += 1
            raise SendQueueFull(f"{target.waiting} sends to {peer[:8]} already waiting")
        target.waiting += 1
        try:
            async with target.lock:
                await self._bridge.call(target.link.send_message, data)
        except (LinkDown, BridgeClosed) as exc:
            raise PeerUnavailable(f"peer {peer[:8]} went down during send: {exc}") from exc
        finally:
            target.waiting -= 1

    # --- trust on live links -------------------------------------------------------------------
    @property
    def trust(self) -> TrustPolicy:
        """The policy signaling and live links are checked against."""
        return self.guard.trust

    def set_trust(self, trust: TrustPolicy) -> None:
        """Check signaling and every live link against ``trust`` from now on (SIGHUP)."""
        self.guard.trust = trust
        self.recheck_trust()

    def recheck_trust(self) -> None:
        """The policy changed in place (a newer revocation list): re-check every live link."""
        self._trust_changed.set()

    def close_peer(self, peer: str, reason: str) -> bool:
        """Close the link to ``peer`` (PeerDown with ``reason``); False if it is not up.

        The dial loop reconnects later as usual, through signaling and its checks.
        """
        target = self._peers.get(peer)
        if target is None:
            return False
        target.on_down(reason)
        self._finish(target, reason)  # not a link from now on ([limits] max_peers counts them)
        return True

    async def _watch_trust(self) -> None:
        """Close each live link whose peer the policy no longer accepts, when that happens."""
        while True:
            self._trust_changed = trio.Event()
            trust, now = self.guard.trust, time.time()
            soonest = math.inf
            for peer_id, peer in list(self._peers.items()):
                key, certificate = self._proofs.get(peer_id, (None, None))
                if key is None or peer.down.is_set():  # closing already: counted once
                    continue
                try:
                    trust.check(key, certificate, now=now)
                except TrustError as exc:
                    reason = _TRUST_DROP_REASONS.get(exc.reason, exc.reason)
                    self.drops.count("trust", reason, peer_id)
                    logger.warning(
                        "closing the link to %s: %s",
                        peer_id[:8],
                        exc,
                        extra={"peer": peer_id, "reason": reason},
                    )
                    self.close_peer(peer_id, f"trust_{reason}")
                    continue
                expires = trust.expires_at(certificate)
                if expires is not None:
                    soonest = min(soonest, expires)
            # Wake just after the soonest expiry, or when the policy changes. Expiry is wall-clock
            # time and trio sleeps on the monotonic clock: waking at least hourly bounds how late
            # a step of the wall clock (NTP) can make the close.
            delay = min(max(0.0, soonest - time.time()) + 0.01, _TRUST_RECHECK_S)
            with trio.move_on_after(delay):
                await self._trust_changed.wait()

    # --- events ---------------------------------------------------------------------------------
    def _emit(self, event: TransportEvent) -> None:
        try:
            self._event_send.send_nowait(event)
        except trio.WouldBlock:
            self.counters["event_channel_full"] += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _remember_name(self, message: SignalingRequest) -> None:
        if message.name:
            self._names[message.sender_id] = message.name
        self._proofs[message.sender_id] = (message.sender, message.cert)

    def _remember_candidate(self, candidate: PeerCandidate) -> None:
        """Record where a peer is; at most ``max_candidates`` are kept (bounded memory and dial
        work, whoever signs requests): the least recently seen idle one is forgotten first."""
        peer_id = candidate.node_id
        assert peer_id is not None
        self._candidates.pop(peer_id, None)  # re-inserted last: most recently seen
        if len(self._candidates) >= self.config.max_candidates:
            busy = self._peers.keys() | self._pending
            idle = next((c for c in self._candidates if c not in busy), None)
            if idle is None:
                self.drops.count("resource", "candidates_full", peer_id)
                return
            del self._candidates[idle]
            self._retry.pop(idle, None)
            self._names.pop(idle, None)
            self._proofs.pop(idle, None)
            self.drops.count("resource", "candidate_forgotten", idle)
        self._candidates[peer_id] = candidate

    # --- connections ----------------------------------------------------------------------------
    async def _new_link(self, peer: _Peer) -> RtcLink:
        bridge = self._bridge
        assert bridge is not None
        return RtcLink(
            self.config.link_settings(),
            on_message=lambda data: bridge.to_trio(peer.on_message, data),
            on_down=lambda reason: bridge.to_trio(peer.on_down, reason),
            on_drop=lambda reason: bridge.to_trio(self.drops.count, "link", reason, peer.node_id),
        )

    async def _close_link(self, peer: _Peer) -> None:
        if peer.link is not None and self._bridge is not None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(5),
                contextlib.suppress(BridgeClosed, Exception),
            ):
                await self._bridge.call(peer.link.close)

    async def _run_peer(self, peer: _Peer) -> None:
        """Announce the peer, hold it until it goes down, then clean up and plan a reconnect."""
        old = self._peers.get(peer.node_id)
        if old is not None:
            self._finish(old, "replaced")
            old.on_down("replaced")
        self._peers[peer.node_id] = peer
        self._retry.pop(peer.node_id, None)
        peer.announced = True
        self._emit(PeerUp(peer.node_id))
        self._trust_changed.set()  # check the new link now and time its expiry
        for data in peer.early:
            self._emit(MessageReceived(peer.node_id, data))
        peer.early.clear()
        try:
            await peer.down.wait()
        finally:
            self._finish(peer, peer.reason or "shutdown")
            await self._close_link(peer)
            self._plan_retry(peer.node_id, first=True)
            self._wake.set()

    def _finish(self, peer: _Peer, reason: str) -> None:
        if peer.finished:
            return
        peer.finished = True
        if self._peers.get(peer.node_id) is peer:
            del self._peers[peer.node_id]
        self._emit(PeerDown(peer.node_id, reason))

    def _plan_retry(self, key: str, *, first: bool = False) -> None:
        cfg = self.config
        retry = self._retry.setdefault(key, _Retry())
        retry.delay = (
            cfg.reconnect_min_s
            if first
            else min(cfg.reconnect_max_s, max(cfg.reconnect_min_s, retry.delay * 2))
        )
        retry.at = trio.current_time() + retry.delay * random.uniform(0.8, 1.2)

    def _due(self, key: str) -> bool:
        retry = self._retry.get(key)
        return retry is None or retry.at <= trio.current_time()

    async def _consume_candidates(self, receive: trio.MemoryReceiveChannel[PeerCandidate]) -> None:
        async with receive:
            async for candidate in receive:
                self.add_candidate(candidate)

    async def _dial_loop(self) -> None:
        assert self._nursery is not None
        while True:
            for peer_id, candidate in list(self._candidates.items()):
                if peer_id in self._peers or peer_id in self._pending or not self._due(peer_id):
                    continue
                if not self._wants(peer_id):
                    continue
                if not self._may_open_link():
                    break
                self._pending.add(peer_id)
                self._plan_retry(peer_id)
                if self.node_id < peer_id:
                    self._start_scope(peer_id, self._dial, candidate)
                else:
                    self._start_scope(peer_id, self._invite, candidate, peer_id)
            for candidate in self._static:
                key = f"{candidate.host}:{candidate.port}"
                if key in self._pending or not self._due(key):
                    continue
                known = [
                    c
                    for c in self._candidates.values()
                    if (c.host, c.port) == (candidate.host, candidate.port)
                ]
                if known and known[0].node_id in self._peers:
                    continue
                if not self._may_open_link():
                    break
                self._pending.add(key)
                self._plan_retry(key)
                self._start_scope(None, self._invite, candidate, key)
            self._wake = trio.Event()
            with trio.move_on_after(0.25):
                await self._wake.wait()

    def _start_scope(
        self, peer: str | None, fn: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        """Start the work for one remote party as its own contained scope (see drops.py)."""
        assert self._nursery is not None
        self._nursery.start_soon(contained, self.drops, "signaling", peer, fn, *args)

    def _may_open_link(self) -> bool:
        """Room for one more half-open link and its descriptors? (Counted when there is not.)"""
        if self.budget.near_limit():
            self.drops.count("resource", "descriptor_budget")
            return False
        if len(self._pending) >= self.config.max_pending_links:
            self.drops.count("resource", "pending_links_full")
            return False
        return True

    async def _invite(self, candidate: PeerCandidate, key: str) -> None:
        try:
            frame, nonce = self.guard.seal_invite(
                candidate.public_key,
                candidate.node_id or "",
                self.signaling_port,
                time.time(),
                self._priority(candidate.node_id),
            )
            reply = await exchange(
                candidate.host,
                candidate.port,
                frame,
                timeout_s=self.config.connect_timeout_s,
                local_address=self._local_address,
            )
            ack = self.guard.check_reply(reply, "invite-ack", nonce, candidate.node_id, time.time())
            self._remember_name(ack)
        except (OSError, trio.TooSlowError, SignalingRefused) as exc:  # expected: named reasons
            self.counters[f"invite_failed_{getattr(exc, 'reason', type(exc).__name__)}"] += 1
            self._failed(candidate.node_id)
            return
        finally:
            self._pending.discard(key)
        if ack.sender_id != self.node_id:
            host = ack.host or candidate.host
            self._remember_candidate(
                PeerCandidate(host, ack.port, ack.sender_id, ack.sender, candidate.source)
            )
            if self.node_id < ack.sender_id:
                self._retry.pop(ack.sender_id, None)
            self._wake.set()

    async def _dial(self, candidate: PeerCandidate) -> None:
        peer_id = candidate.node_id
        assert peer_id is not None and candidate.public_key is not None and self._bridge
        peer = _Peer(peer_id, self)
        opened = False
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                self.counters["peer_connections_created"] += 1
                peer.link = await self._bridge.call(self._new_link, peer)
                sdp = await self._bridge.call(peer.link.create_offer)
                frame, nonce = self.guard.seal_offer(
                    candidate.public_key,
                    peer_id,
                    sdp,
                    self.signaling_port,
                    time.time(),
                    self._priority(peer_id),
                )
                reply = await exchange(
                    candidate.host, candidate.port, frame, local_address=self._local_address
                )
                answer = self.guard.check_reply(reply, "sdp-answer", nonce, peer_id, time.time())
                self._remember_name(answer)
                await self._bridge.call(peer.link.accept_answer, answer.sdp)
                await self._bridge.call(peer.link.wait_open)
            opened = True
        except (OSError, trio.TooSlowError, SignalingRefused, LinkDown, ValueError) as exc:
            self.counters[f"dial_failed_{getattr(exc, 'reason', type(exc).__name__)}"] += 1
            self._failed(peer_id)
            return  # anything else is counted by the contained scope around us
        finally:
            self._pending.discard(peer_id)
            if not opened:
                await self._close_link(peer)
        await self._run_peer(peer)

    async def _on_request(self, request: SignalingRequest) -> bytes | None:
        """Signaling handler: the request is already verified, trusted and addressed to us."""
        assert self._bridge is not None and self._nursery is not None
        now = time.time()
        self._remember_name(request)
        self._remember_candidate(
            PeerCandidate(request.host, request.port, request.sender_id, request.sender, "invite")
        )
        if request.kind == "invite":
            # An invite we answer with an offer is a neighbour request ([limits] max_peers).
            if (
                self.link_policy is not None
                and self.node_id < request.sender_id
                and not self.link_policy.accept(request.sender_id, request.priority)
            ):
                self.drops.count("link", "max_peers", request.sender_id)
                return None
            if self.node_id < request.sender_id and request.sender_id not in self._peers:
                self._retry.pop(request.sender_id, None)
                self._wake.set()
            return self.guard.seal_invite_ack(request, self.signaling_port, now)[0]
        # One half-open link per member: a newer offer replaces an older one still opening.
        older = self._accepting.pop(request.sender_id, None)
        if older is not None:
            older.on_down("replaced")
            self.drops.count("signaling", "offer_replaced", request.sender_id)
        if not self._may_open_link():
            return None
        if self.link_policy is not None and not self.link_policy.accept(
            request.sender_id, request.priority
        ):
            self.drops.count("link", "max_peers", request.sender_id)
            return None
        peer = _Peer(request.sender_id, self)
        self._pending.add(request.sender_id)
        self._accepting[request.sender_id] = peer
        answered = False
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                self.counters["peer_connections_created"] += 1
                peer.link = await self._bridge.call(self._new_link, peer)
                sdp = await self._bridge.call(peer.link.accept_offer, request.sdp)
            answer = self.guard.seal_answer(request, sdp, time.time())[0]
            self._start_scope(request.sender_id, self._finish_accept, peer)
            answered = True
            return answer
        except (trio.TooSlowError, LinkDown, ValueError) as exc:
            self.counters[f"accept_failed_{type(exc).__name__}"] += 1
            return None
        finally:
            if not answered:
                self._release_accept(peer)
                await self._close_link(peer)

    def _release_accept(self, peer: _Peer) -> None:
        if self._accepting.get(peer.node_id) is peer:
            del self._accepting[peer.node_id]
            self._pending.discard(peer.node_id)

    async def _finish_accept(self, peer: _Peer) -> None:
        assert self._bridge is not None and peer.link is not None
        opened = False
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                async with trio.open_nursery() as race:  # open, or replaced by a newer offer
                    race.start_soon(self._stop_when_down, peer, race.cancel_scope)
                    try:
                        await self._bridge.call(peer.link.wait_open)
                    except LinkDown:  # here, not around the nursery: it would come grouped
                        self.counters["accept_failed_LinkDown"] += 1
                        return
                    finally:
                        race.cancel_scope.cancel()
            opened = not peer.down.is_set()
        except trio.TooSlowError:
            self.counters["accept_failed_TooSlowError"] += 1
            return
        finally:
            self._release_accept(peer)
            if not opened:
                await self._close_link(peer)
        if opened:
            await self._run_peer(peer)

    @staticmethod
    async def _stop_when_down(peer: _Peer, scope: trio.CancelScope) -> None:
        await peer.down.wait()
        scope.cancel()
