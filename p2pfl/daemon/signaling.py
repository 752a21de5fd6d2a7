"""Signaling: signed SDP offers/answers (and invites) over a small trio TCP listener.

Every signaling message is an envelope sealed in ``Domain.SIGNALING`` (so it can never pass as a
protocol message, nor the reverse) whose body names both node ids, carries a fresh 16-byte nonce
and an expiry. aiortc accepts any DTLS certificate and then checks it against the fingerprint in
the remote SDP, so a signed SDP is what binds the data channel to the peer's Ed25519 key.

Kinds (body fields; ``from``/``to`` are node ids, ``cert`` an optional federation certificate):

``sdp-offer``   from, to, nonce, expires_ms, sdp, host, port, cert  (the smaller id offers)
``sdp-answer``  from, to, nonce, reply_to, expires_ms, sdp, host, cert
``invite``      from, to ("" when unknown: static peers), nonce, expires_ms, host, port, cert
                ("I am here at <host>:<port>; the smaller of us should offer")
``invite-ack``  from, to, nonce, reply_to, expires_ms, host, port, cert

``host`` is the sender's own configured address (omitted when it listens on every address).
Where it is present, replies and later dials go there, never to the TCP source address: in a
shared namespace (127.0.0.2, .3, ... on one loopback) or behind a multi-homed host the source can
be 127.0.0.1 or another interface the sender does not listen on.

One request and one response per TCP connection, each a u32 big-endian length plus the frame.
``SignalingGuard.check_request`` refuses, *before any WebRTC resources exist*: rate-limited
sources, oversized frames, bad signatures, replays, stale or far-future expiries, SDP or invites
addressed to another node, untrusted keys, the wrong offering role, SDP without a DTLS
fingerprint, and members over their own rate (keyed by the verified sender id, so rotating source
addresses gains nothing). Each refusal is counted once in the node's ``DropLog`` (stage
``signaling``) and closes the connection unanswered.

The listener is built for hostile input (``serve_signaling``): every connection is its own
contained scope (a reset, a half-close or any error ends that connection alone and is counted);
concurrent connections are capped globally and per source address; a request must arrive whole
within ``read_timeout_s`` (so a held-open connection costs a few seconds and one slot); and near
the descriptor limit new connections are refused (stage ``resource``) instead of failing later.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import trio

from p2pfl.daemon.drops import DropLog, contained
from p2pfl.daemon.limits import DescriptorBudget
from p2pfl.identity import NodeIdentity
from p2pfl.trust import TrustError, TrustPolicy
from p2pfl.wire import Domain, EnvelopeVerifier, SequenceCounter, WireError, seal

__all__ = [
    "MAX_SIGNALING_FRAME",
    "RateLimiter",
    "SignalingGuard",
    "SignalingLimits",
    "SignalingRefused",
    "SignalingRequest",
    "exchange",
    "serve_signaling",
]

MAX_SIGNALING_FRAME = 64 * 1024
MAX_SDP_CHARS = 32 * 1024
REQUEST_KINDS = ("sdp-offer", "invite")
_LENGTH = struct.Struct(">I")
logger = logging.getLogger(__name__)


def _is_usable_sdp(sdp: object) -> TypeGuard[str]:
    """A bounded SDP string with a DTLS fingerprint: the part the signed envelope binds."""
    return isinstance(sdp, str) and len(sdp) <= MAX_SDP_CHARS and "a=fingerprint:" in sdp


def _valid_host(value: object) -> bool:
    """A signed ``host``: an IPv4 address or a DNS name, nothing that could be a URL or a list."""
    if not isinstance(value, str) or not 0 < len(value) <= 253 or value == "0.0.0.0":
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(value).version == 4
    return all(c.isalnum() or c in "-." for c in value)


class SignalingRefused(Exception):
    """A signaling message was refused; ``reason`` is the counted slug."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SignalingRequest:
    """A verified offer or invite."""

    kind: str
    sender: bytes  # public key
    sender_id: str
    nonce: bytes
    port: int  # the sender's signaling port
    sdp: str  # "" for an invite
    host: str  # where to reach the sender: its signed ``host``, else the TCP source address
    name: str | None = None  # the sender's federation member name (from trust), if any
    cert: bytes | None = None  # the certificate trust accepted (re-checked on live links)
    priority: bool = (
        False  # [limits] max_peers: the sender has no open link (p2pfl.daemon.sampling)
    )


class RateLimiter:
    """Token bucket per key (a source address, or a verified member id).

    ``burst`` requests at once, ``rate`` per second after. Memory is bounded by ``max_keys``: the
    least recently seen key is forgotten first, so a flood of new keys costs only their own
    buckets and never resets anyone else's.
    """

    def __init__(self, rate: float = 5.0, burst: float = 20.0, max_keys: int = 4096) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed


@dataclass(frozen=True, slots=True)
class SignalingLimits:
    """What a stranger can make the signaling listener spend (all tunable in ``[limits]``)."""

    max_connections: int = 64  # concurrent signaling connections, all sources together
    max_per_source: int = 8  # concurrent connections from one source address
    read_timeout_s: float = 5.0  # the request frame must arrive whole within this
    handler_timeout_s: float = 15.0  # answering an accepted offer (WebRTC set-up) at most


class SignalingGuard:
    """Seals our signaling messages and checks everyone else's (no I/O, testable alone)."""

    def __init__(
        self,
        identity: NodeIdentity,
        trust: TrustPolicy,
        *,
        certificate: bytes | None = None,
        host: str | None = None,
        ttl_s: float = 30.0,
        rate: RateLimiter | None = None,
        member_rate: RateLimiter | None = None,
        counters: Counter[str] | None = None,
        drops: DropLog | None = None,
    ) -> None:
        self.identity = identity
        self.trust = trust
        self.certificate = certificate
        self.host = None if host in (None, "", "0.0.0.0") else host
        self.ttl_s = ttl_s
        self.rate = rate or RateLimiter()
        # A member re-dials with backoff (>= 0.5 s): 2 requests a second, 10 at once is plenty.
        self.member_rate = member_rate or RateLimiter(rate=2.0, burst=10.0)
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.drops = drops if drops is not None else DropLog()
        self._seq = SequenceCounter(time.time())
        self._verifier = EnvelopeVerifier(
            is_trusted=lambda _key: True,  # trust needs the certificate: checked below
            max_skew_s=ttl_s,
            own_key=identity.public_key,
        )
        self._nonces: dict[bytes, float] = {}

    # --- sealing ----------------------------------------------------------------------------
    def _seal(
        self, kind: str, body: dict[str, Any], recipient: bytes | None, now: float
    ) -> tuple[bytes, bytes]:
        nonce = os.urandom(16)
        body = {
            "from": self.identity.node_id,
            "nonce": nonce,
            "expires_ms": round((now + self.ttl_s) * 1000),
            "cert": self.certificate,
            **({"host": self.host} if self.host is not None else {}),
            **body,
        }
        frame = seal(
            self.identity,
            kind=kind,
            body=body,
            seq=self._seq.next(),
            now=now,
            recipient=recipient,
            domain=Domain.SIGNALING,
        )
        return frame, nonce

    def seal_offer(
        self, peer_key: bytes, peer_id: str, sdp: str, port: int, now: float, priority: bool = False
    ) -> tuple[bytes, bytes]:
        body: dict[str, Any] = {"to": peer_id, "sdp": sdp, "port": port}
        if priority:
            body["priority"] = True
        return self._seal("sdp-offer", body, peer_key, now)

    def seal_answer(self, offer: SignalingRequest, sdp: str, now: float) -> tuple[bytes, bytes]:
        body = {"to": offer.sender_id, "reply_to": offer.nonce, "sdp": sdp}
        return self._seal("sdp-answer", body, offer.sender, now)

    def seal_invite(
        self, peer_key: bytes | None, peer_id: str, port: int, now: float, priority: bool = False
    ) -> tuple[bytes, bytes]:
        body: dict[str, Any] = {"to": peer_id, "port": port}
        if priority:
            body["priority"] = True
        return self._seal("invite", body, peer_key, now)

    def seal_invite_ack(
        self, invite: SignalingRequest, port: int, now: float
    ) -> tuple[bytes, bytes]:
        body = {"to": invite.sender_id, "reply_to": invite.nonce, "port": port}
        return self._seal("invite-ack", body, invite.sender, now)

    # --- checking ---------------------------------------------------------------------------
    def _refuse(self, reason: str, message: str = "", peer: str | None = None) -> SignalingRefused:
        self.drops.count("signaling", reason, peer)
        return SignalingRefused(reason, message)

    def _open(
        self, frame: bytes, now: float, kinds: tuple[str, ...]
    ) -> tuple[Any, Any, str | None]:
        if len(frame) > MAX_SIGNALING_FRAME:
            raise self._refuse("oversized")
        try:
            envelope = self._verifier.open(frame, now=now, domain=Domain.SIGNALING)
        except WireError as exc:
            raise self._refuse(exc.reason, str(exc)) from None
        body = envelope.body
        if envelope.kind not in kinds:
            raise self._refuse("unexpected_kind", envelope.kind)
        if not isinstance(body, dict) or not all(
            [
                body.get("from") == envelope.sender_id,
                isinstance(body.get("to"), str),
                isinstance(body.get("nonce"), bytes) and len(body["nonce"]) == 16,
                type(body.get("expires_ms")) is int,
                body.get("cert") is None or isinstance(body.get("cert"), bytes),
                body.get("host") is None or _valid_host(body.get("host")),
            ]
        ):
            raise self._refuse("malformed_body")
        if body["to"] not in (self.identity.node_id, "") or (
            body["to"] == "" and envelope.kind != "invite"
        ):
            raise self._refuse("not_addressed_to_us")
        if envelope.kind != "invite" and envelope.recipient != self.identity.public_key:
            raise self._refuse("not_addressed_to_us")
        now_ms = now * 1000
        if body["expires_ms"] <= now_ms:
            raise self._refuse("stale", "expiry has passed")
        if body["expires_ms"] > now_ms + 2 * self.ttl_s * 1000:
            raise self._refuse("expiry_too_far")
        self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        if body["nonce"] in self._nonces:
            raise self._refuse("replayed_nonce")
        try:
            name = self.trust.check(envelope.sender, body["cert"], now=now)
        except TrustError as exc:
            raise self._refuse(f"untrusted_{exc.reason}", str(exc), envelope.sender_id) from None
        self._nonces[body["nonce"]] = body["expires_ms"] / 1000
        return envelope, body, name

    def check_request(self, frame: bytes, source: str, now: float) -> SignalingRequest:
        """Verify an offer or invite from ``source``; raise SignalingRefused(reason)."""
        if not self.rate.allow(source, now):
            raise self._refuse("rate_limited")
        envelope, body, name = self._open(frame, now, REQUEST_KINDS)
        if not self.member_rate.allow(envelope.sender_id, now):
            raise self._refuse("member_rate_limited", "", envelope.sender_id)
        port = body.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise self._refuse("malformed_body", "bad port")
        if type(body.get("priority", False)) is not bool:
            raise self._refuse("malformed_body", "bad priority")
        sdp = ""
        if envelope.kind == "sdp-offer":
            if envelope.sender_id >= self.identity.node_id:
                raise self._refuse("wrong_role", "the node with the smaller id offers")
            sdp = body.get("sdp")
            if not _is_usable_sdp(sdp):
                raise self._refuse("bad_sdp")
        self.counters[f"accepted_{envelope.kind}"] += 1
        return SignalingRequest(
            envelope.kind,
            envelope.sender,
            envelope.sender_id,
            body["nonce"],
            port,
            sdp,
            body.get("host") or source,
            name,
            body["cert"],
            body.get("priority", False),
        )

    def check_reply(
        self, frame: bytes, kind: str, request_nonce: bytes, peer_id: str | None, now: float
    ) -> SignalingRequest:
        """Verify the answer to our offer (or the ack of our invite)."""
        envelope, body, name = self._open(frame, now, (kind,))
        if body.get("reply_to") != request_nonce:
            raise self._refuse("not_our_request")
        if peer_id is not None and envelope.sender_id != peer_id:
            raise self._refuse("unexpected_peer")
        sdp = body.get("sdp", "")
        port = body.get("port", 0)
        if kind == "sdp-answer" and not _is_usable_sdp(sdp):
            raise self._refuse("bad_sdp")
        if type(port) is not int:
            raise self._refuse("malformed_body")
        return SignalingRequest(
            envelope.kind,
            envelope.sender,
            envelope.sender_id,
            body["nonce"],
            port,
            sdp,
            body.get("host") or "",
            name,
            body["cert"],
        )


# --- I/O ------------------------------------------------------------------------------------
async def _read_frame(stream: trio.SocketStream) -> bytes:
    """One length-prefixed frame; a reset, a close or a half-close mid-frame is SignalingRefused
    (``reset`` / ``truncated``), an over-long length ``oversized``: never a transport error."""
    buffer = bytearray()
    need = _LENGTH.size
    length: int | None = None
    while True:
        while len(buffer) < need:
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise SignalingRefused("reset", f"connection reset mid-frame: {exc}") from None
            if not chunk:
                raise SignalingRefused("truncated", "connection closed mid-frame")
            buffer += chunk
        if length is None:
            (length,) = _LENGTH.unpack_from(buffer)
            if length > MAX_SIGNALING_FRAME:
                raise SignalingRefused("oversized")
            need = _LENGTH.size + length
            continue
        return bytes(buffer[_LENGTH.size : need])


async def _write_frame(stream: trio.SocketStream, frame: bytes) -> None:
    try:
        await stream.send_all(_LENGTH.pack(len(frame)) + frame)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise SignalingRefused("reset", f"connection reset while writing: {exc}") from None


async def exchange(
    host: str,
    port: int,
    frame: bytes,
    *,
    timeout_s: float = 10.0,
    local_address: str | None = None,
) -> bytes:
    """Send one request frame to a signaling listener and return its response frame.

    Raises OSError when unreachable, SignalingRefused("no_reply") when the peer refused
    (it closes the connection without answering), SignalingRefused("reset") when it resets the
    connection, and trio.TooSlowError after ``timeout_s``.
    """
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        async with stream:
            await _write_frame(stream, frame)
            try:
                return await _read_frame(stream)
            except SignalingRefused as exc:
                if exc.reason == "reset":
                    raise
                raise SignalingRefused("no_reply", f"{host}:{port} refused or closed") from None


def _abort(stream: trio.SocketStream) -> None:
    """Close at once with a reset (SO_LINGER 0): a refused connection holds no TIME_WAIT state."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


Handler = Callable[[SignalingRequest], Awaitable[bytes | None]]


async def serve_signaling(
    guard: SignalingGuard,
    handler: Handler,
    host: str,
    port: int = 0,
    *,
    limits: SignalingLimits | None = None,
    budget: DescriptorBudget | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port``; started with ``nursery.start`` it reports the bound port.

    Each connection is a contained scope: read one frame (``read_timeout_s``), check it with
    the guard, await ``handler(request)`` (``handler_timeout_s``) and write its response frame
    (None: close without answering). Nothing a connection does reaches the caller's nursery.
    """
    limits = limits or SignalingLimits()
    budget = budget or DescriptorBudget()
    drops = guard.drops
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    per_source: Counter[str] = Counter()
    active = 0

    async def one(stream: trio.SocketStream, source: str) -> None:
        async with stream:
            with trio.move_on_after(limits.read_timeout_s) as scope:
                try:
                    frame = await _read_frame(stream)
                except SignalingRefused as exc:
                    drops.count("signaling", exc.reason)
                    return
            if scope.cancelled_caught:
                drops.count("signaling", "read_timeout")
                return
            try:
                request = guard.check_request(frame, source, time.time())
            except SignalingRefused:
                return  # counted by the guard
            with trio.move_on_after(limits.handler_timeout_s) as scope:
                response = await handler(request)
                if response is not None:
                    try:
                        await _write_frame(stream, response)
                    except SignalingRefused as exc:  # reset before our answer went out
                        drops.count("signaling", exc.reason, request.sender_id)
            if scope.cancelled_caught:
                drops.count("signaling", "handler_timeout", request.sender_id)

    async def run_one(stream: trio.SocketStream, source: str) -> None:
        nonlocal active
        try:
            await contained(drops, "signaling", None, one, stream, source)
        finally:
            active -= 1
            per_source[source] -= 1
            if per_source[source] <= 0:
                del per_source[source]

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        nonlocal active
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: shed, wait, go on (never end the node)
                name = errno.errorcode.get(exc.errno or 0, "oserror").lower()
                drops.count("resource", f"accept_{name}")
                await trio.sleep(0.1)  # let descriptors free up; never a busy loop
                continue
            try:
                source = str(stream.socket.getpeername()[0])
            except OSError:  # already reset before we looked
                drops.count("signaling", "reset")
                _abort(stream)
                continue
            if budget.near_limit(stream.socket.fileno()):
                reason = "descriptor_budget"
            elif active >= limits.max_connections:
                reason = "signaling_connections_full"
            elif per_source[source] >= limits.max_per_source:
                reason = "signaling_source_full"
            else:
                active += 1
                per_source[source] += 1
                nursery.start_soon(run_one, stream, source)
                continue
            drops.count("resource", reason)
            _abort(stream)

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_loop, listener, nursery)
            task_status.started(bound)
    finally:
        for listener in listeners:
            listener.socket.close()
