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
(``StunProtocol.receiver``/``local_candidate``, ``Connection._protocols``/``_nominated``, which
:class:`TunedDtls` sends through as aioice's ``Connection.send`` does, ``Connection._queue`` and
that asyncio queue's deque) and of pyOpenSSL
(``_lib``, ``_ffi``, ``Connection._ssl``/``_into_ssl``/``_from_ssl``/``_raise_ssl_error``);
:func:`tune_datagrams` checks they exist and leaves everything as it is where a release has
changed them, and applies nothing on an aiortc release they were not checked against.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from aioice import ice as _ice
from aiortc import RTCPeerConnection
from aiortc import rtcdtlstransport as _dtls
from OpenSSL import SSL

from p2pfl.daemon.sctp import aiortc_checked

__all__ = [
    "SOCKET_BUFFER_BYTES",
    "LeanConnection",
    "LeanStunProtocol",
    "TunedDtls",
    "tune_datagrams",
]

SOCKET_BUFFER_BYTES = 2 * 1024 * 1024  # asked of the kernel for each ICE socket's receive buffer
_RECORD_BUFFER = 16 * 1024 + 2048  # the largest DTLS record plaintext (2^14) and then some
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

    def _set_state(self, state: Any) -> None:
        if state == _State.CONNECTED:
            self._p2pfl_ice = self.transport._connection
            ssl = self._ssl
            if type(ssl) is SSL.Connection and all(hasattr(ssl, name) for name in _PYOPENSSL):
                ssl.__class__ = LeanConnection
                ssl.p2pfl_prepare()
            _tune_ice(self.transport)
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
        await pair.protocol.send_data(record, pair.remote_addr)
        self._RTCDtlsTransport__tx_bytes += result
        self._RTCDtlsTransport__tx_packets += 1


def _tune_ice(ice_transport: Any) -> None:
    """The connection's host protocols: no STUN parse for DTLS, larger receive buffers."""
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


_PYOPENSSL = ("_ssl", "_into_ssl", "_from_ssl")
_LIB = ("SSL_write", "SSL_read", "BIO_write", "BIO_read")


def tune_datagrams(pc: RTCPeerConnection) -> bool:
    """Make ``pc``'s DTLS transport a :class:`TunedDtls`; False where it cannot.

    Call when the SCTP transport exists (as :func:`p2pfl.daemon.sctp.tune`), before the DTLS
    handshake completes. Only on an aiortc release the overrides were checked against
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
    return True
