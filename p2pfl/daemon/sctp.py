"""Delayed SCTP acknowledgements and linear reassembly for aiortc's data channels (asyncio side).

aiortc answers every packet carrying DATA with its own SACK. On a bulk transfer that is one
SACK per 1,200-byte packet: the receiver encrypts and sends as many packets as it receives, and
the sender decrypts and processes as many SACKs as it sends packets. Profiled on a 64 MiB
transfer, building and sending SACKs was 37 % of the receiver's busy time and handling them 35 %
of the sender's.

RFC 9260 section 6.2 asks for less: acknowledge at least every second packet, and within a
short delay otherwise; acknowledge at once when a packet reveals a gap or a duplicate, so that
fast retransmission is not held up. :class:`DelayedAckSctp` does exactly that on top of aiortc's
``RTCSctpTransport``. It is applied per connection (:func:`delay_acks`), by changing the class of
the connection's own SCTP transport before its association starts: no module of aiortc is
altered, and other users of aiortc in the process are unaffected.

The receiver has a second per-packet cost that grows with the message size: after every DATA
chunk aiortc walks the stream's whole reassembly list looking for a complete message, so a
message of n fragments costs n^2/2 steps (a 256 KiB frame is 220 fragments). A chunk that lands
at the tail of the list without the last-fragment flag cannot complete any message (every
message it belongs to still misses its last fragment, and any other complete one was delivered
when it completed), so :class:`LinearInboundStream` skips the walk for it: one walk per message.

Both override private methods of aiortc (``_send_sack``, ``_get_inbound_stream``,
``InboundStream.add_chunk``/``pop_messages``) and read private attributes; :func:`delay_acks`
checks they exist and leaves the transport as it is where an aiortc release has changed them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiortc import RTCPeerConnection, RTCSctpTransport
from aiortc import rtcsctptransport as _sctp
from aiortc.utils import uint32_gt

__all__ = ["ACK_DELAY_S", "ACK_EVERY", "DelayedAckSctp", "LinearInboundStream", "delay_acks"]

ACK_EVERY = 2  # packets with DATA per SACK, at most (RFC 9260 6.2: "at least every second")
ACK_DELAY_S = 0.005  # a lone packet is acknowledged this late at most (the RFC allows 500 ms)
_REQUIRED = (
    "_send_sack",
    "_get_inbound_stream",
    "_sack_misordered",
    "_sack_duplicates",
    "_sack_needed",
)
_LAST_FRAGMENT: int = getattr(_sctp, "SCTP_DATA_LAST_FRAG", 0)
_InboundStream: Any = getattr(_sctp, "InboundStream", None)


class LinearInboundStream(_InboundStream or object):  # type: ignore[misc]
    """aiortc's reassembly, skipping the search after a tail chunk that ends no message."""

    _p2pfl_skip = False

    def add_chunk(self, chunk: Any) -> None:
        tail = not self.reassembly or uint32_gt(chunk.tsn, self.reassembly[-1].tsn)
        self._p2pfl_skip = bool(tail and not chunk.flags & _LAST_FRAGMENT)
        super().add_chunk(chunk)

    def pop_messages(self) -> Any:
        if self._p2pfl_skip:
            self._p2pfl_skip = False
            return iter(())
        return super().pop_messages()


class DelayedAckSctp(RTCSctpTransport):
    """aiortc's SCTP transport, acknowledging every second DATA packet (or after a delay)."""

    # Class-level defaults: instances get here by a class change, without __init__.
    _p2pfl_unacked = 0
    _p2pfl_timer: asyncio.TimerHandle | None = None
    _p2pfl_ack_task: asyncio.Future[None] | None = None

    async def _send_sack(self) -> None:
        urgent = bool(self._sack_misordered or self._sack_duplicates)
        if not urgent and self._p2pfl_unacked + 1 < ACK_EVERY:
            self._p2pfl_unacked += 1
            if self._p2pfl_timer is None:
                loop = asyncio.get_running_loop()
                self._p2pfl_timer = loop.call_later(ACK_DELAY_S, self._p2pfl_deadline)
            return
        await self._p2pfl_ack_now()

    def _get_inbound_stream(self, stream_id: int) -> Any:
        stream = super()._get_inbound_stream(stream_id)
        if type(stream) is _InboundStream:
            stream.__class__ = LinearInboundStream
        return stream

    async def _p2pfl_ack_now(self) -> None:
        if self._p2pfl_timer is not None:
            self._p2pfl_timer.cancel()
            self._p2pfl_timer = None
        self._p2pfl_unacked = 0
        await super()._send_sack()

    def _p2pfl_deadline(self) -> None:
        self._p2pfl_timer = None
        if self._sack_needed and self._association_state == self.State.ESTABLISHED:
            # Held so the task is not collected before it runs.
            self._p2pfl_ack_task = asyncio.ensure_future(self._p2pfl_ack_now())
        else:
            self._p2pfl_unacked = 0


def delay_acks(pc: RTCPeerConnection) -> bool:
    """Give ``pc``'s SCTP transport delayed acknowledgements; False where it cannot.

    Call after the transport exists (``createDataChannel`` on the offering side,
    ``setRemoteDescription`` on the answering side) and before the association starts.
    """
    sctp: Any = pc.sctp
    if sctp is None or type(sctp) is not RTCSctpTransport:
        return False
    if not all(hasattr(sctp, name) for name in _REQUIRED) or not _LAST_FRAGMENT:
        return False
    if _InboundStream is None or not all(
        hasattr(_InboundStream, name) for name in ("add_chunk", "pop_messages")
    ):
        return False
    sctp.__class__ = DelayedAckSctp
    return True
