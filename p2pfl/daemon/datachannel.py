"""One WebRTC peer connection with one reliable, ordered data channel (asyncio side).

Everything in this module runs on the bridge's asyncio loop (see ``bridge.py``); the trio side
only calls its coroutines through ``AsyncioBridge.call`` and receives its events through the
callbacks it passes in, which the bridge hands to trio.

Framing: aiortc messages are at most 256 KiB, so a message of any size travels as frames::

    DATA       u8 kind=4 | u64 transfer id | u32 index | u32 count | u64 total bytes |
               u32 CRC-32C of the whole message | chunk
    HEARTBEAT  u8 kind=2 | u64 sender's monotonic clock, ns   (a ping: answered by a PONG)
    PONG       u8 kind=3 | u64 the ping's timestamp, echoed

Each heartbeat is a ping; its echo gives a round-trip sample, smoothed as in RFC 6298
(``srtt = 7/8 srtt + 1/8 sample``) into ``RtcLink.rtt_s``. Only the sender ever reads its own
timestamps, so clocks need not agree. A bare one-byte HEARTBEAT (older nodes) is accepted and not
answered. Samples taken while a transfer fills the channel include that queueing delay.

The channel is reliable and ordered, so frames of one transfer arrive in order; the receiver
checks index/count/total/digest on every frame and the digest on reassembly, and drops a bad
transfer with a counted reason. The digest guards the framing (a frame of the wrong transfer, a
chunk cut wrongly), not the content: DTLS authenticates every record and the wire layer's Ed25519
signature covers every message, so a cryptographic hash here would buy nothing those do not.
Protocol 1 sent a BLAKE2b-128, 0.09 CPU-seconds per 64 MiB at each end on the machines we measure
on; CRC-32C (google-crc32c, with SSE 4.2) takes 0.006. Protocol 1's DATA frames (kind 1) are
dropped, counted as ``data_frame_protocol_1``: the peer runs a release whose frames this one does
not read (mDNS pairs only nodes of one protocol version, ``adverts.PROTOCOL_VERSION``). The sender
waits on ``bufferedAmount`` (high/low water marks) so a large model is never queued whole inside
aiortc.

A transfer holds at most ``max_message_bytes`` while it is incomplete, and not for ever: one that
has had no new frame for ``transfer_timeout_s`` (a sender that stopped half-way, e.g. because its
send was cancelled) is freed and dropped as ``incomplete_timeout`` by the link's watch loop,
rather than held until the next transfer arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import google_crc32c

from p2pfl.daemon._sctp_limits import SACK_EVERY
from p2pfl.daemon.bridge import closes_with_bridge, owning_datagram_endpoints, sweeps_with_bridge

if TYPE_CHECKING:
    from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection

__all__ = [
    "FRAME_LIMIT",
    "HEADER",
    "ICE_PATHS",
    "PING",
    "LinkSettings",
    "Reassembler",
    "RtcLink",
    "ice_configuration",
    "ice_path",
    "split_frames",
]

FRAME_LIMIT = 256 * 1024  # aiortc's maximum message size
HEADER = struct.Struct(">BQIIQI")
KIND_DATA = 4  # protocol 2; protocol 1's DATA frames were kind 1 (with a BLAKE2b-128 digest)
_KIND_DATA_PROTOCOL_1 = 1
KIND_HEARTBEAT = 2
KIND_PONG = 3
PING = struct.Struct(">BQ")
RTT_ALPHA = 1 / 8
_transfer_ids = itertools.count(1)
_RELAY_CANDIDATE = re.compile(r"^a=candidate:.* typ relay\b", re.MULTILINE)
_TURN_WARNING_INTERVAL_S = 60.0
_turn_warned_at = -math.inf
log = logging.getLogger(__name__)


ICE_PATHS = {
    "host": "host",
    "srflx": "server reflexive",
    "prflx": "server reflexive",
    "relay": "relayed",
}
"""ICE candidate type -> the path a person reads in `p2pfl peers`."""
_PATH_RANK = {"host": 0, "server reflexive": 1, "relayed": 2}


def ice_path(local_type: str, remote_type: str) -> str:
    """The path a selected candidate pair uses: relayed if either end is a TURN relay, else
    server reflexive (through a NAT) if either end is, else host (a direct address).

    A peer-reflexive candidate (learned from a check, not signalled) is a NAT's mapping too.
    aioice sends a server-reflexive candidate from its host socket, so our own end always reads
    "host" or "relay"; the remote end's type tells the rest.
    """
    paths = [ICE_PATHS.get(local_type, local_type), ICE_PATHS.get(remote_type, remote_type)]
    return max(paths, key=lambda path: _PATH_RANK.get(path, -1))


def ice_configuration(settings: LinkSettings) -> RTCConfiguration:
    """aiortc's configuration for one link: our servers only, TURN credentials on TURN URLs.

    With ``relay_only`` aioice gathers no host or server-reflexive candidate and ignores the
    peer's mDNS ones, so every packet of the link goes through the TURN server.
    """
    rtc = _aiortc()
    servers = [
        rtc.RTCIceServer(
            urls=url, username=settings.turn_username, credential=settings.turn_credential
        )
        if url.startswith("turn")
        else rtc.RTCIceServer(urls=url)
        for url in settings.ice_servers
    ]
    policy = (
        rtc.RTCIceTransportPolicy.RELAY if settings.relay_only else rtc.RTCIceTransportPolicy.ALL
    )
    configuration: RTCConfiguration = rtc.RTCConfiguration(
        iceServers=servers, iceTransportPolicy=policy
    )
    return configuration


def _aiortc() -> Any:
    """aiortc, imported on the first link rather than with this module.

    aiortc and what it imports (aioice, dnspython, pyOpenSSL and PyAV, which its ``__init__``
    loads for its media classes) cost about 0.2 CPU-seconds; a daemon listens for signaling and
    reports ready without any of it, so it is paid when the first link is made.
    tests/ml/test_lazy_imports.py checks that a ready daemon has not imported it.
    """
    import aiortc

    return aiortc


def split_frames(data: bytes, frame_bytes: int, transfer_id: int) -> Iterator[bytes]:
    """Cut ``data`` into DATA frames of at most ``frame_bytes`` bytes each (header included).

    Lazy, so a large message is never held twice; the digest (CRC-32C) is computed up front.
    """
    if not HEADER.size < frame_bytes <= FRAME_LIMIT:
        raise ValueError(f"frame_bytes must be in ({HEADER.size}, {FRAME_LIMIT}]")
    chunk = frame_bytes - HEADER.size
    view = memoryview(data)
    count = max(1, -(-len(data) // chunk))
    digest = google_crc32c.value(bytes(data))
    return (
        HEADER.pack(KIND_DATA, transfer_id, i, count, len(data), digest)
        + view[i * chunk : (i + 1) * chunk]
        for i in range(count)
    )


class Reassembler:
    """Turns frames back into messages; bad input is dropped with a reason, never raised.

    ``timeout_s``: :meth:`expire` drops a transfer that has had no frame for this long;
    ``clock``: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        max_message_bytes: int,
        on_drop: Callable[[str], None],
        *,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_message_bytes
        self._on_drop = on_drop
        self._timeout_s = timeout_s
        self._clock = clock
        self._last_frame = 0.0
        self._id = -1
        self._count = 0
        self._total = 0
        self._digest = 0
        self._parts: list[memoryview] = []
        self._size = 0
        self._dropped = -1

    def _reset(self, reason: str | None) -> None:
        if reason is not None:
            self._on_drop(reason)
            self._dropped = self._id  # the rest of a dropped transfer is skipped uncounted
        self._id, self._parts, self._size = -1, [], 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of the incomplete transfer held now (0 when none)."""
        return self._size

    def abandon(self) -> None:
        """The link is closing: free the incomplete transfer, if any (dropped, counted)."""
        if self._id != -1:
            self._reset("incomplete_at_close")

    def expire(self) -> bool:
        """Free and drop the incomplete transfer if it had no frame for ``timeout_s``."""
        if self._id != -1 and self._clock() - self._last_frame > self._timeout_s:
            self._reset("incomplete_timeout")
            return True
        return False

    def feed(self, frame: bytes) -> bytes | None:
        """Take one DATA frame; return the message when it is complete and intact."""
        if len(frame) < HEADER.size:
            self._on_drop("short_frame")
            return None
        _, transfer_id, index, count, total, digest = HEADER.unpack_from(frame)
        if index != 0 and transfer_id == self._dropped:
            return None
        if index == 0:
            if self._id != -1:
                self._reset("incomplete_transfer")
            if count == 0 or total > self._max:
                self._on_drop("oversized_message" if total > self._max else "bad_frame_count")
                self._dropped = transfer_id
                return None
            self._id, self._count, self._total, self._digest = transfer_id, count, total, digest
        elif (transfer_id, count, total, digest) != (
            self._id,
            self._count,
            self._total,
            self._digest,
        ) or index != len(self._parts):
            self._reset("out_of_sequence_frame")
            return None
        # A view, not a copy: a 256 KiB slice is a fresh allocation (page faults included), and
        # joining views of the frames costs a fifth of joining copies of them.
        chunk = memoryview(frame)[HEADER.size :]
        self._size += len(chunk)
        if self._size > self._total:
            self._reset("frame_overrun")
            return None
        self._parts.append(chunk)
        self._last_frame = self._clock()
        if len(self._parts) < self._count:
            return None
        message = b"".join(self._parts)
        ok = len(message) == self._total and google_crc32c.value(message) == self._digest
        self._reset(None if ok else "digest_mismatch")
        return message if ok else None


@dataclass(frozen=True, slots=True)
class LinkSettings:
    ice_servers: tuple[str, ...] = ()  # e.g. ("stun:stun.lan:3478",); empty: host candidates only
    turn_username: str | None = None  # for the turn:/turns: URL in ice_servers
    turn_credential: str | None = field(default=None, repr=False)
    relay_only: bool = False  # gather and use TURN relayed candidates only (ICE policy "relay")
    frame_bytes: int = FRAME_LIMIT
    buffered_high: int = 4 * 1024 * 1024
    buffered_low: int = 1024 * 1024
    heartbeat_interval_s: float = 1.0
    peer_timeout_s: float = 6.0
    max_message_bytes: int = 80 * 1024 * 1024
    sack_every: int = SACK_EVERY  # data packets per SCTP SACK (see sctp.py; 1: every one)
    path_mtu: int = 1500  # largest IP packet between the nodes: sizes SCTP's DATA chunks
    transfer_timeout_s: float = 30.0  # an incomplete transfer with no new frame this long is freed


class LinkDown(ConnectionError):
    """The peer connection or its data channel is closed."""


class RtcLink:
    """A peer connection + data channel. Create, use and close only on the asyncio loop.

    ``on_message(data)``, ``on_down(reason)`` and ``on_drop(reason)`` are called on the asyncio
    thread; the transport passes functions that forward to trio. ``on_down`` is called once.

    ``close()`` closes everything the link opened (the peer connection, and with it the DTLS and
    ICE transports and their UDP sockets); calls share one close, which goes on when a caller is
    cancelled, and a bridge that closes awaits the close of every link still open. aiortc starts
    tasks of its own that nobody awaits (a flush, a transmit, the connect); those still pending
    when the link closes are adopted: their outcome is retrieved (a ConnectionError once the link
    is gone is expected), so none is reported as an exception never retrieved.
    """

    def __init__(
        self,
        settings: LinkSettings,
        *,
        on_message: Callable[[bytes], None],
        on_down: Callable[[str], None],
        on_drop: Callable[[str], None],
    ) -> None:
        self.settings = settings
        # Always our own ICE configuration: aiortc's default contacts a public STUN server.
        self._pc: RTCPeerConnection = _aiortc().RTCPeerConnection(ice_configuration(settings))
        self._endpoints: set[asyncio.BaseTransport] = set()  # every UDP socket ICE opened
        self._channel: RTCDataChannel | None = None
        self._open = asyncio.Event()
        self._drained = asyncio.Event()
        self._closed = asyncio.Event()
        self._on_message = on_message
        self._on_down = on_down
        self._on_drop = on_drop
        self._reassembler = Reassembler(
            settings.max_message_bytes, on_drop, timeout_s=settings.transfer_timeout_s
        )
        self._down_reason: str | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._unregister = closes_with_bridge(self.close)
        sweeps_with_bridge(self._close_sockets)
        self.last_heard = time.monotonic()
        # Read from the trio thread without a bridge hop: plain attributes, written only here.
        self.rtt_s: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_seen: float | None = None  # Unix time of the last frame from the peer
        self.ice_path: str | None = None  # "host", "server reflexive" or "relayed" once open
        self.remote_address: str | None = None  # the peer's end of the selected pair, "ip:port"
        self._pc.on("connectionstatechange", self._on_state)
        self._pc.on("datachannel", self._attach)

    # --- set-up -------------------------------------------------------------------------------
    async def create_offer(self) -> str:
        self._attach(self._pc.createDataChannel("p2pfl", ordered=True))
        self._tune()
        with owning_datagram_endpoints(self._endpoints):  # candidate gathering opens sockets
            await self._pc.setLocalDescription(await self._pc.createOffer())
        self._check_relay(self._pc.localDescription.sdp)
        return self._pc.localDescription.sdp

    async def accept_offer(self, sdp: str) -> str:
        await self._pc.setRemoteDescription(_aiortc().RTCSessionDescription(sdp=sdp, type="offer"))
        self._tune()
        with owning_datagram_endpoints(self._endpoints):
            await self._pc.setLocalDescription(await self._pc.createAnswer())
        self._check_relay(self._pc.localDescription.sdp)
        return self._pc.localDescription.sdp

    def _check_relay(self, sdp: str) -> None:
        """Say so when a TURN server is configured but gave this link no relay address (at most
        once a minute: every link, and every retry of one, would say the same)."""
        global _turn_warned_at
        turn = next((url for url in self.settings.ice_servers if url.startswith("turn")), None)
        if turn is None or _RELAY_CANDIDATE.search(sdp):
            return
        now = time.monotonic()
        if now - _turn_warned_at < _TURN_WARNING_INTERVAL_S:
            return
        _turn_warned_at = now
        log.warning(
            "the TURN server gave this link no relay address: it is unreachable or refused the "
            "[discovery] ice_credentials; %s",
            "with ice_transport_policy = relay no link can open"
            if self.settings.relay_only
            else "only direct and STUN paths are tried",
            extra={"turn": turn},
        )

    async def accept_answer(self, sdp: str) -> None:
        await self._pc.setRemoteDescription(_aiortc().RTCSessionDescription(sdp=sdp, type="answer"))

    def _tune(self) -> None:
        from p2pfl.daemon.dtls import tune_datagrams
        from p2pfl.daemon.sctp import tune

        # False (the transport left as aiortc made it) where an aiortc release changed it.
        tune(
            self._pc,
            sack_every=self.settings.sack_every,
            path_mtu=self.settings.path_mtu,
            on_drop=self._on_drop,
        )
        tune_datagrams(self._pc, on_drop=self._on_drop)

    async def wait_open(self) -> None:
        """Wait until the data channel is open, then start heartbeats and the liveness check."""
        opened = asyncio.ensure_future(self._open.wait())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait([opened, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            closed.cancel()
        if not self._open.is_set():
            raise LinkDown(self._down_reason or "closed before the data channel opened")
        self.last_heard = time.monotonic()
        self._read_selected_pair()
        self._monitor = asyncio.ensure_future(self._watch())
        self._monitor.add_done_callback(self._watch_ended)

    def _read_selected_pair(self) -> None:
        """Record the ICE path and the peer's address of the pair ICE nominated.

        aiortc has no public API for the selected pair: this reads aioice's nominated pair
        through the SCTP -> DTLS -> ICE transports, and leaves both unknown (None) where an
        aiortc or aioice release moved it.
        """
        try:
            pc: Any = self._pc
            connection = pc.sctp.transport.transport._connection
            pair = next(iter(connection._nominated.values()))
            local, remote = pair.local_candidate, pair.remote_candidate
            self.ice_path = ice_path(local.type, remote.type)
            host, port = pair.remote_addr
            self.remote_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except (AttributeError, StopIteration, TypeError, ValueError):
            log.debug("no selected ICE pair to read")

    def _attach(self, channel: RTCDataChannel) -> None:
        if self._channel is not None:
            self._on_drop("extra_data_channel")
            return
        self._channel = channel
        channel.bufferedAmountLowThreshold = self.settings.buffered_low
        channel.on("open", self._open.set)
        channel.on("message", self._on_frame)
        channel.on("bufferedamountlow", self._drained.set)
        channel.on("close", lambda: self._down("channel_closed"))
        if channel.readyState == "open":
            self._open.set()

    # --- runtime ------------------------------------------------------------------------------
    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._down(f"connection_{self._pc.connectionState}")

    def _on_frame(self, frame: bytes | str) -> None:
        self.last_heard = time.monotonic()
        self.last_seen = time.time()
        if not isinstance(frame, bytes) or not frame:
            self._on_drop("text_or_empty_frame")
            return
        self.bytes_in += len(frame)
        if frame[0] == KIND_HEARTBEAT:
            if len(frame) == PING.size:
                self._send(bytes([KIND_PONG]) + frame[1:])
            elif len(frame) != 1:
                self._on_drop("bad_heartbeat")
            return
        if frame[0] == KIND_PONG:
            self._on_pong(frame)
            return
        if frame[0] != KIND_DATA:
            old = frame[0] == _KIND_DATA_PROTOCOL_1
            self._on_drop("data_frame_protocol_1" if old else "unknown_frame_kind")
            return
        message = self._reassembler.feed(frame)
        if message is not None:
            self._on_message(message)

    def _on_pong(self, frame: bytes) -> None:
        now = time.monotonic_ns()
        if len(frame) != PING.size:
            self._on_drop("bad_pong")
            return
        _, sent = PING.unpack(frame)
        sample = (now - sent) / 1e9
        # Only echoes of our own pings from this link's lifetime are samples; anything else is
        # a confused or lying peer.
        if not 0 <= sample <= max(self.settings.peer_timeout_s, 1.0) * 2:
            self._on_drop("bad_pong")
            return
        rtt = self.rtt_s
        self.rtt_s = sample if rtt is None else rtt + RTT_ALPHA * (sample - rtt)

    def _send(self, frame: bytes) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(frame)
            self.bytes_out += len(frame)

    async def _watch(self) -> None:
        from p2pfl.daemon.sctp import last_packet_at

        interval = self.settings.heartbeat_interval_s
        while not self._closed.is_set():
            self._send(PING.pack(KIND_HEARTBEAT, time.monotonic_ns()))
            # Frames or, below them, any SCTP packet: a large frame can take seconds to complete
            # on a lossy path while the peer is plainly alive.
            silent = time.monotonic() - max(self.last_heard, last_packet_at(self._pc))
            if silent > self.settings.peer_timeout_s:
                self._down("heartbeat_timeout")
                return
            self._reassembler.expire()
            await asyncio.sleep(interval)

    def _watch_ended(self, task: asyncio.Task[None]) -> None:
        # A bug in the watch loop must not leave a link without liveness checks, nor go unseen.
        if not task.cancelled() and task.exception() is not None:
            log.warning("link watch loop failed", exc_info=task.exception())
            self._down("watch_failed")

    def _down(self, reason: str) -> None:
        if self._down_reason is None:
            self._down_reason = reason
            self._closed.set()
            self._drained.set()
            self._reassembler.abandon()
            self._on_down(reason)

    async def send_message(self, data: bytes) -> None:
        """Frame ``data`` and hand every frame to the channel, waiting on bufferedAmount."""
        channel = self._channel
        if channel is None or self._closed.is_set():
            raise LinkDown(self._down_reason or "no open data channel")
        frames = split_frames(data, self.settings.frame_bytes, next(_transfer_ids))
        for frame in frames:
            while channel.bufferedAmount > self.settings.buffered_high:
                self._drained.clear()
                if self._closed.is_set():
                    break
                await self._drained.wait()
            if self._closed.is_set() or channel.readyState != "open":
                raise LinkDown(self._down_reason or "data channel closed during send")
            channel.send(frame)
            self.bytes_out += len(frame)

    async def close(self) -> None:
        """Close the link and everything it opened; safe to call again or concurrently."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._down("closed_locally")
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.wait([self._monitor])
        self._adopt_tasks()
        try:
            await self._pc.close()
        finally:
            self._adopt_tasks()  # any that closing started
            self._close_sockets()
            self._unregister()

    def _close_sockets(self) -> None:
        """Close every UDP socket ICE opened for this link, also one whose creation finished
        after aioice's own close ran (a close racing candidate gathering), so none outlives
        the link or the loop."""
        for ice in getattr(self._pc, "_RTCPeerConnection__iceTransports", ()):
            connection = getattr(ice, "_connection", None)
            for protocol in list(getattr(connection, "_protocols", ())):
                transport = getattr(protocol, "transport", None)
                if transport is not None and not transport.is_closing():
                    transport.close()
        # Also those a cancelled gathering opened and never handed to aioice's connection.
        for endpoint in self._endpoints:
            if not endpoint.is_closing():
                endpoint.close()

    def _owners(self) -> list[object]:
        """The objects behind this link whose methods aiortc and aioice run as tasks."""
        pc: Any = self._pc
        owners: list[object] = [pc]
        sctp = pc.sctp
        if sctp is not None:
            owners += [sctp, sctp.transport]
        for ice in getattr(pc, "_RTCPeerConnection__iceTransports", ()):
            connection = getattr(ice, "_connection", None)
            owners += [ice, ice.iceGatherer, connection]
            owners += getattr(connection, "_protocols", ())
        return owners

    def _adopt_tasks(self) -> None:
        owners = {id(owner) for owner in self._owners() if owner is not None}
        for task in asyncio.all_tasks():
            frame = getattr(task.get_coro(), "cr_frame", None)
            if frame is not None and id(frame.f_locals.get("self")) in owners:
                task.add_done_callback(_retrieve_after_close)


def _retrieve_after_close(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, ConnectionError):
        log.debug("aiortc task ended by the link closing", extra={"error": str(exc)})
    elif exc is not None:
        log.warning("aiortc task failed as the link closed", exc_info=exc)
