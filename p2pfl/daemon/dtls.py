"""The per-datagram path under SCTP, tuned: DTLS records and ICE datagrams (asyncio side).

Every SCTP packet of a data channel is one DTLS record in one UDP datagram, handled in Python
on both ends: aioice receives it, aiortc's DTLS transport decrypts it with pyOpenSSL, SCTP parses
it (``sctp.py``). Profiled during a 64 MiB transfer between two node processes (a sampling
profiler, ~75 µs of CPU per datagram at the receiver), a third of the receiver's time went to
this path below SCTP, most of it Python overhead around small C calls: pyOpenSSL's checks,
buffer allocations and an exception per datagram, aioice's attempt to parse each datagram as
STUN, which fails with an exception. The tuning here removes that overhead; what reaches
OpenSSL, what goes on the wire and what SCTP receives are unchanged, so either end interoperates
with any peer.

**Records without pyOpenSSL's per-call overhead.** After the handshake the connection's
``send``/``recv``/``bio_write`` call the same OpenSSL functions pyOpenSSL calls, into a buffer
allocated once per link (:class:`LeanConnection`); a call that does not succeed at once is
handed to pyOpenSSL's own error handling, which raises exactly what aiortc expects. aiortc
flushes the outgoing memory BIO after every datagram it receives (for handshake and alert
records); with nothing to flush, pyOpenSSL raises ``WantReadError`` and aiortc catches it: once
per datagram. :class:`TunedDtls` reads the BIO without raising. Measured in isolation (one
1,384-byte record encrypted and decrypted): 17.7 µs through pyOpenSSL, 10.2 µs this way.

**No queue layers per datagram.** aioice queues each received datagram; aiortc's DTLS loop
takes it through ``Connection.recv`` and ``recvfrom`` (two coroutines) and ``Queue.get``, then
decrypts it through pyOpenSSL and flushes the outgoing BIO through ``_write_ssl`` (a third).
During a transfer several datagrams arrive per wake-up, so most are already queued when the loop
asks: :meth:`TunedDtls._recv_next` takes such a DTLS datagram from the queue directly and
decrypts and flushes in line (95 % of them in tests/net/test_dtls.py's clean exchange); an empty
queue, the end of the connection and anything not DTLS take aiortc's path.

**No STUN parse for DTLS.** RFC 7983 demultiplexes a WebRTC datagram on its first byte: 0-3
STUN, 20-63 DTLS. aioice parses every datagram as STUN and takes the ``ValueError`` as "data";
:class:`LeanStunProtocol` hands one whose first byte says DTLS to the connection directly (a
STUN message never starts with such a byte).

**Datagrams batched per wake-up (UDP GSO).** Each datagram was one ``sendto`` system call,
and on the sender the kernel's work per call (on a veth pair or loopback, the receiving side's
too) was the largest single cost left: 11 % of both ends' CPU in a two-link transfer. Once
connected, :meth:`TunedDtls._send_data` encrypts each record at once but leaves it pending;
:meth:`TunedDtls._p2pfl_flush` runs when the event loop's pass ends (the DATA packets of every
SACK handled in one wake-up, the SACKs for every batch of DATA received in one: about 14
records per flush in a transfer) and hands them to the kernel in as few ``sendmsg`` calls as
UDP generic segmentation offload allows (udp(7) ``UDP_SEGMENT``: records of one size, the last
may be shorter), through a duplicate of the ICE socket's descriptor. The kernel sends each
record as a datagram of its own: the bytes on the wire, and their order, are those of one
``sendto`` per record. Any other datagram (an alert, aiortc's own path) first flushes the
pending ones. Where the kernel refuses a batch (no GSO, or none on this path) the records go
one ``sendto`` each, and so does everything after on that connection; a full socket buffer
sends that batch the same way and leaves the event loop's transport to queue it; a relayed
pair (TURN) or a platform other than Linux never batches.

**Batches read in one system call (UDP GRO).** With the sender batching, the receiver was the
busier end: one wake-up, ``recvfrom`` and ``datagram_received`` per datagram in the event loop's
UDP transport, which cannot return the segment size of a coalesced read. Once connected, each
host socket of the connection is read by :class:`GroTransport` instead (the event loop's
transport is closed over a duplicate of its descriptor, so the socket itself stays open) with
udp(7) ``UDP_GRO`` on: a GSO batch from the peer arrives as one buffer with its segment size,
and :func:`gro_segments` cuts it into the datagrams it was sent as, each handed to the protocol
in order exactly as a datagram read alone (STUN included); a datagram sent alone arrives alone.
A read that cannot be split (truncated data or control message, a malformed segment size) is
dropped whole and counted (``on_drop``). A kernel without GRO keeps the event loop's transport;
a relayed candidate (TURN: aioice's protocol over its allocation's transport) is left as it is.
At most 32 datagrams go to the protocol per wake-up, as libuv reads them. The read path then
costs 1.2 µs of CPU per datagram from a peer sending through GSO, against 2.75 through the
event loop's transport, and 3.2 against 2.8 from a peer that does not batch
(``benchmarks/bench_gro.py``): a few per cent of a datagram's cost either way.

**Larger receive buffers.** A receiver busy in Python lets datagrams pile up in its socket;
with the kernel's default buffer (208 KiB, ~140 full datagrams) the benchmark saw 6-60 drops per
64 MiB, each an SCTP retransmission that halves the sender's congestion window. The ICE sockets
ask for :data:`SOCKET_BUFFER_BYTES`; the kernel grants up to ``net.core.rmem_max`` (4 MiB on the
benchmark machine, where the drops went to 0; 208 KiB by default on many distributions, where
the request changes nothing unless an administrator raises it).

Applied per connection (:func:`tune_datagrams`) by changing the class of the connection's own
DTLS transport, and, once the handshake is done, of its pyOpenSSL connection and its aioice host
protocols: no module is altered. The overrides use private names of aiortc
(``_send_data``, ``_write_ssl``, ``_recv_next``, ``_set_state``, the transmit and receive
counters, ``__handshake_done``, ``_data_receiver``,
``transport._connection``), of aioice
(``StunProtocol.receiver``/``local_candidate``/``transport``, ``Connection._protocols``/
``_nominated``, which :class:`TunedDtls` sends through as aioice's ``Connection.send`` does,
``Connection._queue`` and that asyncio queue's deque) and of pyOpenSSL
(``_lib``, ``_ffi``, ``Connection._ssl``/``_into_ssl``/``_from_ssl``/``_raise_ssl_error``);
the host sockets' transports are replaced only where they are the event loop's own UDP
transports (uvloop's ``UDPTransport``, asyncio's ``_SelectorDatagramTransport``);
:func:`tune_datagrams` checks they exist and leaves everything as it is where a release has
changed them, and applies nothing on an aiortc release they were not checked against.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

from aioice import ice as _ice
from aiortc import RTCPeerConnection
from aiortc import rtcdtlstransport as _dtls
from OpenSSL import SSL

from p2pfl.daemon.sctp import aiortc_checked

__all__ = [
    "GSO_MAX_SEGMENTS",
    "SOCKET_BUFFER_BYTES",
    "UDP_GRO",
    "UDP_SEGMENT",
    "GroTransport",
    "LeanConnection",
    "LeanStunProtocol",
    "TunedDtls",
    "gro_segments",
    "gso_groups",
    "read_coalesced",
    "send_segments",
    "tune_datagrams",
]

SOCKET_BUFFER_BYTES = 2 * 1024 * 1024  # asked of the kernel for each ICE socket's receive buffer
_RECORD_BUFFER = 16 * 1024 + 2048  # the largest DTLS record plaintext (2^14) and then some
# UDP generic segmentation offload (Linux 4.18+, udp(7)): one sendmsg carries several datagrams
# of one size (the last may be shorter), each sent on the wire as a datagram of its own.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
GSO_MAX_SEGMENTS = 32  # datagrams per sendmsg (the kernel takes 64 or more)
_GSO_MAX_BYTES = 60_000  # a UDP payload is at most 65,507 bytes
_GSO_SIZE = struct.Struct("=H")  # the segment size, a native u16 control message
# UDP generic receive offload (Linux 5.0+, udp(7)): a batch of datagrams of one flow is read as
# one buffer, its segment size in a control message (a native int).
UDP_GRO = getattr(socket, "UDP_GRO", 104)
_GRO_SIZE = struct.Struct("=i")
GRO_READ_BYTES = 65536  # one read: a UDP payload, coalesced or not, is at most 65,507 bytes
_GRO_CONTROL_BYTES = socket.CMSG_SPACE(_GRO_SIZE.size) if hasattr(socket, "CMSG_SPACE") else 16
# Datagrams handed to the protocol per wake-up, then back to the event loop (libuv reads as
# many): the records of a larger batch would wait in aioice's queue, their SACKs with them.
_DATAGRAMS_PER_WAKEUP = 32
_MSG_TRUNC, _MSG_CTRUNC = int(socket.MSG_TRUNC), int(socket.MSG_CTRUNC)  # plain ints: no enum
_SEND_QUEUE_BYTES = 4 * 1024 * 1024  # datagrams waiting for a writable socket; more are lost
_lib: Any = getattr(SSL, "_lib", None)
_ffi: Any = getattr(SSL, "_ffi", None)
_StunProtocol: Any = getattr(_ice, "StunProtocol", None)
_DtlsTransport: Any = getattr(_dtls, "RTCDtlsTransport", object)
_State: Any = getattr(_dtls, "State", None)

log = logging.getLogger(__name__)


class LeanConnection(SSL.Connection):
    """pyOpenSSL's connection; ``send``/``recv``/``bio_write`` without per-call overhead.

    Instances get here by a class change of a connected ``SSL.Connection``
    (:meth:`TunedDtls._set_state`), which also calls :meth:`p2pfl_prepare`.
    """

    _p2pfl_buffer: Any = None
    _p2pfl_view: Any = None  # cffi buffer over _p2pfl_buffer: a slice of it is bytes

    def p2pfl_prepare(self) -> None:
        self._p2pfl_buffer = _ffi.new("char[]", _RECORD_BUFFER)
        self._p2pfl_view = _ffi.buffer(self._p2pfl_buffer)

    def send(self, buf: Any, flags: int = 0) -> int:
        if type(buf) is not bytes or not buf:
            return super().send(buf, flags)
        result: int = _lib.SSL_write(self._ssl, buf, len(buf))
        if result <= 0:
            self._raise_ssl_error(self._ssl, result)
        return result

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        if flags is not None or not 0 < bufsiz <= _RECORD_BUFFER:
            return super().recv(bufsiz, flags)
        result: int = _lib.SSL_read(self._ssl, self._p2pfl_buffer, bufsiz)
        if result <= 0:
            self._raise_ssl_error(self._ssl, result)
            return b""
        data: bytes = self._p2pfl_view[:result]
        return data

    def bio_write(self, buf: Any) -> int:
        if type(buf) is bytes and buf:
            result: int = _lib.BIO_write(self._into_ssl, buf, len(buf))
            if result > 0:
                return result
        return super().bio_write(buf)  # nothing was written: pyOpenSSL's own path and errors

    def p2pfl_take(self, bufsiz: int) -> bytes:
        """``bio_read`` that returns b"" when nothing is pending, instead of raising."""
        result: int = _lib.BIO_read(self._from_ssl, self._p2pfl_buffer, bufsiz)
        return self._p2pfl_view[:result] if result > 0 else b""


class LeanStunProtocol(_StunProtocol or object):  # type: ignore[misc]
    """aioice's host protocol, handing a DTLS datagram (RFC 7983) over without a STUN parse."""

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if type(data) is bytes and data and 19 < data[0] < 64:
            self.receiver.data_received(data, self.local_candidate.component)
            return
        super().datagram_received(data, addr)


class TunedDtls(_DtlsTransport):  # type: ignore[misc]
    """aiortc's DTLS transport with lean records once connected (see the module docstring)."""

    _p2pfl_ice: Any = None  # aioice's Connection under the ICE transport
    # Records leave at the end of the event loop's pass through UDP GSO (_p2pfl_flush): on
    # Linux, until the kernel refuses a batch.
    _p2pfl_gso = sys.platform.startswith("linux")
    _p2pfl_pending: list[bytes] | None = None  # records waiting for the flush, in order
    _p2pfl_gso_protocol: Any = None  # the aioice protocol whose socket _p2pfl_gso_socket is
    _p2pfl_gso_socket: socket.socket | None = None  # a duplicate of its socket's descriptor
    p2pfl_segmented = 0  # records sent in a batch of two or more through GSO (tests count them)
    _p2pfl_on_drop: Callable[[str], None] | None = None  # counts a read GroTransport drops

    def _set_state(self, state: Any) -> None:
        if state in (_State.CLOSED, _State.FAILED):
            self._p2pfl_flush()
            self._p2pfl_close_socket()
        if state == _State.CONNECTED:
            self._p2pfl_ice = self.transport._connection
            ssl = self._ssl
            if type(ssl) is SSL.Connection and all(hasattr(ssl, name) for name in _PYOPENSSL):
                ssl.__class__ = LeanConnection
                ssl.p2pfl_prepare()
            _tune_ice(self.transport, self._p2pfl_on_drop)
        super()._set_state(state)

    async def _write_ssl(self) -> None:
        ssl = self._ssl
        if type(ssl) is not LeanConnection or self._p2pfl_ice is None:
            await super()._write_ssl()
            return
        data = ssl.p2pfl_take(1500)  # aiortc's read size: one record per datagram
        if data:
            await self._p2pfl_send_record(data)

    async def _p2pfl_send_record(self, data: bytes) -> None:
        # aioice's Connection.send -> sendto -> the nominated pair's protocol, in one step.
        self._p2pfl_flush()  # after the records before it
        pair = self._p2pfl_ice._nominated.get(1)
        if pair is None:
            raise ConnectionError("Cannot send data, not connected")
        await pair.protocol.send_data(data, pair.remote_addr)
        self._RTCDtlsTransport__tx_bytes += len(data)
        self._RTCDtlsTransport__tx_packets += 1

    async def _recv_next(self) -> None:
        """aiortc's ``_recv_next`` for a DTLS datagram already queued once connected (in a
        transfer, most of them: several arrive per wake-up): taken from aioice's queue directly
        (not through ``recv``/``recvfrom``), the record decrypted and any record OpenSSL made
        meanwhile flushed in line. What it does with each datagram is what aiortc does
        (errors included); everything else takes aiortc's path."""
        ssl = self._ssl
        ice = self._p2pfl_ice
        queue: Any = getattr(ice, "_queue", None)
        waiting = getattr(queue, "_queue", None)  # asyncio.Queue's deque
        item = waiting[0] if waiting else None
        if (
            item is None
            or type(ssl) is not LeanConnection
            or not self._RTCDtlsTransport__handshake_done
            or not ice._nominated
            or type(item[0]) is not bytes
            or not item[0]
            or not 19 < item[0][0] < 64
        ):
            # Nothing queued (wait as aiortc waits), not yet connected, not DTLS, or the end
            # of the connection (None): aiortc's own path.
            await super()._recv_next()
            return
        data = queue.get_nowait()[0]
        self._RTCDtlsTransport__rx_bytes += len(data)
        self._RTCDtlsTransport__rx_packets += 1
        if _lib.BIO_write(ssl._into_ssl, data, len(data)) <= 0:
            ssl.bio_write(data)  # pyOpenSSL's path, and its error
        plaintext: bytes | None = b""
        result = _lib.SSL_read(ssl._ssl, ssl._p2pfl_buffer, 1500)  # aiortc's recv(1500)
        if result > 0:
            plaintext = ssl._p2pfl_view[:result]
        else:
            try:
                ssl._raise_ssl_error(ssl._ssl, result)
            except SSL.ZeroReturnError:
                plaintext = None
            except SSL.Error:
                pass
        # aiortc's _write_ssl: a record OpenSSL made meanwhile (an alert, a close_notify), if any.
        result = _lib.BIO_read(ssl._from_ssl, ssl._p2pfl_buffer, 1500)
        if result > 0:
            await self._p2pfl_send_record(ssl._p2pfl_view[:result])
        if plaintext is None:
            raise ConnectionError  # DTLS shutdown by the remote party
        receiver = self._data_receiver
        if plaintext and receiver is not None:
            await receiver._handle_data(plaintext)

    async def _send_data(self, data: bytes) -> None:
        """aiortc's ``_send_data`` (``send``, then ``_write_ssl``) in one step: every SCTP
        packet passes here."""
        ssl = self._ssl
        ice = self._p2pfl_ice
        if (
            type(ssl) is not LeanConnection
            or ice is None
            or self._state != _State.CONNECTED
            or type(data) is not bytes
            or not data
        ):
            self._p2pfl_flush()  # after the records before it
            await super()._send_data(data)  # aiortc's checks and errors
            return
        result = _lib.SSL_write(ssl._ssl, data, len(data))
        if result <= 0:
            ssl._raise_ssl_error(ssl._ssl, result)
        result = _lib.BIO_read(ssl._from_ssl, ssl._p2pfl_buffer, 1500)
        if result <= 0:
            return
        record = ssl._p2pfl_view[:result]
        pair = ice._nominated.get(1)
        if pair is None:
            raise ConnectionError("Cannot send data, not connected")
        if self._p2pfl_gso:
            pending = self._p2pfl_pending
            if pending is None:
                pending = self._p2pfl_pending = []
                asyncio.get_running_loop().call_soon(self._p2pfl_flush)
            pending.append(record)
            return
        await pair.protocol.send_data(record, pair.remote_addr)
        self._RTCDtlsTransport__tx_bytes += result
        self._RTCDtlsTransport__tx_packets += 1

    def _p2pfl_flush(self) -> None:
        """Send the records :meth:`_send_data` left pending in this pass of the event loop
        (the packets of every SACK handled in one wake-up, the SACKs for every batch of DATA
        received in one), in order, in as few system calls as UDP GSO allows: the same
        datagrams as one ``sendto`` each (:func:`send_segments`). Called soon after the first
        of them (once the task making them waits), and before any other datagram leaves.

        Where the kernel refuses a batch (a full socket buffer; or no UDP GSO, then not again
        on this connection), it and the rest go as aioice's ``send_data`` sends them, one
        ``sendto`` each; where no host socket can be had (a relayed pair), all of them."""
        records, self._p2pfl_pending = self._p2pfl_pending, None
        if not records:
            return
        ice = self._p2pfl_ice
        pair = ice._nominated.get(1) if ice is not None else None
        if pair is None:  # the connection ended since: lost, as a datagram sent then would be
            log.debug("datagrams dropped: not connected", extra={"count": len(records)})
            return
        protocol, address = pair.protocol, pair.remote_addr
        sock = self._p2pfl_socket(protocol)
        sent = 0
        if sock is not None and not protocol.transport.get_write_buffer_size():
            try:
                for group in gso_groups(records):
                    send_segments(sock, group, address)
                    sent += len(group)
                    if len(group) > 1:
                        self.p2pfl_segmented += len(group)
            except OSError as exc:
                if not isinstance(exc, BlockingIOError):  # not a full buffer: no GSO here
                    self._p2pfl_gso = False
                    self._p2pfl_close_socket()
                    log.debug("UDP GSO refused: a datagram per call", extra={"error": str(exc)})
        for record in records[sent:]:
            protocol.transport.sendto(record, address)  # aioice's StunProtocol.send_data
        self._RTCDtlsTransport__tx_bytes += sum(map(len, records))
        self._RTCDtlsTransport__tx_packets += len(records)

    def _p2pfl_socket(self, protocol: Any) -> socket.socket | None:
        """A socket over ``protocol``'s own (a duplicate descriptor: the event loop keeps
        owning its socket), for ``sendmsg``; None where ``protocol`` is not a host UDP one."""
        if protocol is self._p2pfl_gso_protocol:
            return self._p2pfl_gso_socket
        self._p2pfl_close_socket()
        transport = getattr(protocol, "transport", None)
        if type(protocol) is not LeanStunProtocol or transport is None:
            return None
        try:
            sock = _duplicate_udp_socket(transport)
        except OSError as exc:
            log.debug("no socket for UDP GSO", extra={"error": str(exc)})
            self._p2pfl_gso = False
            return None
        if sock is None:
            return None
        self._p2pfl_gso_protocol, self._p2pfl_gso_socket = protocol, sock
        return sock

    def _p2pfl_close_socket(self) -> None:
        sock, self._p2pfl_gso_socket, self._p2pfl_gso_protocol = self._p2pfl_gso_socket, None, None
        if sock is not None:
            sock.close()


def _duplicate_udp_socket(transport: Any) -> socket.socket | None:
    """A socket over a duplicate of ``transport``'s IPv4 or IPv6 UDP socket descriptor (the
    event loop keeps owning its own socket); None where it has no such socket. Raises the
    ``OSError`` of a descriptor that cannot be duplicated."""
    raw = transport.get_extra_info("socket")
    if raw is None or raw.type != socket.SOCK_DGRAM:
        return None
    if raw.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return socket.socket(raw.family, socket.SOCK_DGRAM, fileno=os.dup(raw.fileno()))


def gso_groups(records: list[Any]) -> Iterator[list[Any]]:
    """``records`` cut, in order, into the batches one UDP GSO ``sendmsg`` can carry: records
    of one size, then at most one shorter record, at most :data:`GSO_MAX_SEGMENTS` and about
    60 KB in all."""
    index = 0
    while index < len(records):
        size = len(records[index])
        end = index + 1
        limit = min(len(records), index + GSO_MAX_SEGMENTS, index + max(1, _GSO_MAX_BYTES // size))
        while end < limit and len(records[end]) == size:
            end += 1
        if end < limit and len(records[end]) < size:
            end += 1  # a shorter record ends a batch
        yield records[index:end]
        index = end


def send_segments(sock: socket.socket, records: list[Any], address: tuple[Any, ...]) -> None:
    """Send ``records`` (one :func:`gso_groups` batch) to ``address``, one datagram each, in
    one system call: ``sendmsg`` with a UDP_SEGMENT control message. Raises the kernel's
    ``OSError`` (having sent none of them) where it refuses."""
    if len(records) == 1:
        sock.sendto(records[0], address)
        return
    segment = [(_SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(len(records[0])))]
    sock.sendmsg(records, segment, 0, address)


def _tune_ice(ice_transport: Any, on_drop: Callable[[str], None] | None = None) -> None:
    """The connection's host protocols: no STUN parse for DTLS, larger receive buffers, and
    their sockets read through :class:`GroTransport` where the kernel has UDP GRO."""
    connection = getattr(ice_transport, "_connection", None)
    for protocol in list(getattr(connection, "_protocols", ())):
        if type(protocol) is not _StunProtocol:
            continue  # TURN relays and anything else stay as they are
        if all(hasattr(protocol, name) for name in ("receiver", "local_candidate")):
            protocol.__class__ = LeanStunProtocol
        transport = getattr(protocol, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            try:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < SOCKET_BUFFER_BYTES:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            except OSError as exc:
                log.debug("could not enlarge an ICE socket's buffer", extra={"error": str(exc)})
        if type(protocol) is LeanStunProtocol:
            read_coalesced(protocol, on_drop)


def read_coalesced(protocol: Any, on_drop: Callable[[str], None] | None = None) -> bool:
    """Read ``protocol``'s UDP socket through a :class:`GroTransport` with UDP GRO on, in place
    of its event loop's transport; False (nothing changed) where the socket is not a host UDP
    one, its transport has datagrams waiting to leave, or the kernel has no UDP GRO.

    The event loop's transport is detached from ``protocol`` and closed over a duplicate of its
    descriptor: the socket, its address and whatever the kernel holds for it stay as they were."""
    if not sys.platform.startswith("linux"):
        return False
    old: Any = getattr(protocol, "transport", None)
    if type(old) not in _loop_udp_transports() or old.is_closing():
        return False  # not the event loop's own UDP transport (a TURN allocation's, ours)
    if old.get_write_buffer_size() or not hasattr(old, "set_protocol"):
        return False
    try:
        sock = _duplicate_udp_socket(old)
    except OSError as exc:
        log.debug("no socket for UDP GRO", extra={"error": str(exc)})
        return False
    if sock is None:
        return False
    try:
        sock.setblocking(False)
        sock.setsockopt(_SOL_UDP, UDP_GRO, 1)
    except OSError as exc:  # no UDP GRO in this kernel: the event loop's transport stays
        sock.close()
        log.debug("UDP GRO refused", extra={"error": str(exc)})
        return False
    old.set_protocol(asyncio.DatagramProtocol())  # its connection_lost is not protocol's
    old.close()
    protocol.transport = GroTransport(asyncio.get_running_loop(), sock, protocol, on_drop)
    return True


@functools.cache
def _loop_udp_transports() -> tuple[type, ...]:
    """The UDP transport classes of the event loops :func:`read_coalesced` replaces."""
    from asyncio import selector_events

    found: list[type] = []
    selector = getattr(selector_events, "_SelectorDatagramTransport", None)
    if selector is not None:
        found.append(selector)
    try:
        from uvloop import loop as uvloop_loop
    except ImportError:
        return tuple(found)
    udp = getattr(uvloop_loop, "UDPTransport", None)
    return (*found, udp) if udp is not None else tuple(found)


def gro_segments(
    data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int
) -> list[bytes] | str:
    """The datagrams one ``recvmsg`` of a socket with UDP GRO returned (``data``, its control
    messages and flags), in the order they were sent; or, where the read cannot be split, the
    reason to drop it whole.

    A batch the peer sent through UDP GSO (or the kernel coalesced) comes with its segment
    size: every datagram of it that size, the last perhaps shorter. A read without one is one
    datagram."""
    if flags & _MSG_TRUNC:
        return "udp_read_truncated"  # larger than a UDP payload: not from a kernel's batch
    if flags & _MSG_CTRUNC:
        return "udp_control_truncated"  # the segment size may be lost
    size = 0
    for level, kind, value in ancdata:
        if level == _SOL_UDP and kind == UDP_GRO:
            if len(value) < _GRO_SIZE.size:
                return "udp_bad_segment_size"
            size = _GRO_SIZE.unpack_from(value)[0]
            if size <= 0:
                return "udp_bad_segment_size"
    if not size or size >= len(data):
        return [data]
    return [data[start : start + size] for start in range(0, len(data), size)]


class GroTransport(asyncio.DatagramTransport):
    """A datagram transport over a UDP socket with UDP GRO on (:func:`read_coalesced`): each
    read's datagrams (:func:`gro_segments`) go to the protocol's ``datagram_received`` one by
    one, in order; a read that cannot be split is counted with ``on_drop`` and dropped.

    Sends as asyncio's datagram transports send: at once, or queued (at most
    :data:`_SEND_QUEUE_BYTES`, beyond it lost as a full socket buffer loses them) while the
    socket is full; an ``OSError`` goes to the protocol's ``error_received``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        on_drop: Callable[[str], None] | None = None,
        *,
        read_bytes: int = GRO_READ_BYTES,
    ) -> None:
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._on_drop = on_drop
        self._read_bytes = read_bytes
        self._queue: list[tuple[bytes, Any]] = []
        self._queued = 0
        self.p2pfl_coalesced = 0  # datagrams that arrived in a read of two or more
        loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        handed = 0
        while handed < _DATAGRAMS_PER_WAKEUP:
            sock = self._sock
            if sock is None:
                return
            try:
                data, ancdata, flags, addr = sock.recvmsg(self._read_bytes, _GRO_CONTROL_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            if not ancdata and not flags:
                handed += 1
                self._protocol.datagram_received(data, addr)
                continue
            segments = gro_segments(data, ancdata, flags)
            if isinstance(segments, str):
                log.debug("UDP read dropped", extra={"reason": segments, "bytes": len(data)})
                if self._on_drop is not None:
                    self._on_drop(segments)
                handed += 1
                continue
            handed += len(segments)
            if len(segments) > 1:
                self.p2pfl_coalesced += len(segments)
            for segment in segments:
                if self._sock is None:
                    return  # closed by the protocol meanwhile
                self._protocol.datagram_received(segment, addr)

    def sendto(self, data: Any, addr: Any = None) -> None:
        sock = self._sock
        if sock is None:
            return
        if not self._queue:
            try:
                if addr is None:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._fd, self._write_ready)
            except OSError as exc:
                self._protocol.error_received(exc)
                return
        if self._queued + len(data) > _SEND_QUEUE_BYTES:
            return
        self._queue.append((bytes(data), addr))
        self._queued += len(data)

    def _write_ready(self) -> None:
        while self._queue and self._sock is not None:
            data, addr = self._queue[0]
            try:
                if addr is None:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
            del self._queue[0]
            self._queued -= len(data)
        self._loop.remove_writer(self._fd)

    def get_write_buffer_size(self) -> int:
        return self._queued

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def is_closing(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(self._fd)
        if self._queue:
            self._loop.remove_writer(self._fd)
            self._queue.clear()
            self._queued = 0
        sock.close()
        if not self._loop.is_closed():
            self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


_PYOPENSSL = ("_ssl", "_into_ssl", "_from_ssl")
_LIB = ("SSL_write", "SSL_read", "BIO_write", "BIO_read")


def tune_datagrams(pc: RTCPeerConnection, on_drop: Callable[[str], None] | None = None) -> bool:
    """Make ``pc``'s DTLS transport a :class:`TunedDtls`; False where it cannot.

    Call when the SCTP transport exists (as :func:`p2pfl.daemon.sctp.tune`), before the DTLS
    handshake completes. ``on_drop(reason)`` counts a UDP read dropped as unsplittable
    (:func:`gro_segments`). Only on an aiortc release the overrides were checked against
    (:data:`p2pfl.daemon.sctp.LEAN_AIORTC`).
    """
    sctp: Any = pc.sctp
    dtls = getattr(sctp, "transport", None)
    if dtls is None or type(dtls) is not _DtlsTransport or _State is None:
        return False
    if not aiortc_checked():  # the overrides repeat parts of aiortc's DTLS logic
        return False
    if _StunProtocol is None or _lib is None or _ffi is None:
        return False
    if not all(hasattr(_lib, name) for name in _LIB):
        return False
    if not all(hasattr(SSL.Connection, name) for name in ("_raise_ssl_error", "bio_read")):
        return False
    if not all(
        hasattr(dtls, name)
        for name in (
            "_ssl",
            "_write_ssl",
            "_set_state",
            "transport",
            "_RTCDtlsTransport__tx_bytes",
            "_RTCDtlsTransport__tx_packets",
            "_RTCDtlsTransport__rx_bytes",
            "_RTCDtlsTransport__rx_packets",
            "_RTCDtlsTransport__handshake_done",
            "_data_receiver",
            "_recv_next",
        )
    ):
        return False
    if not hasattr(getattr(dtls, "transport", None), "_connection"):
        return False
    connection = getattr(dtls.transport, "_connection", None)
    if not all(hasattr(connection, name) for name in ("_nominated", "_queue")):
        return False
    dtls.__class__ = TunedDtls
    dtls._p2pfl_on_drop = on_drop
    return True
