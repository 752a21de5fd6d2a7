"""SCTP tuned for bulk transfers between two p2pfl nodes, on top of aiortc (asyncio side).

A data channel's throughput is bounded by aiortc's per-packet work in Python: every packet is
serialized, encrypted, sent, received, decrypted and parsed one at a time, on both ends. The
tuning here, per connection, cuts the number of packets and the work per packet; and it judges
a peer's liveness by its packets.

**Fewer SACKs.** aiortc answers every packet carrying DATA with its own SACK: one SACK per data
packet, which the receiver encrypts and sends and the sender decrypts and processes. Profiled on
a 64 MiB transfer, SACKs were 37 % of the receiver's busy time and 35 % of the sender's.
RFC 9260 section 6.2 asks for less: a SACK for at least every second packet and within a short
delay, at once when a packet reveals a gap or a duplicate (so fast retransmission is not held
up); the socket API (RFC 6458 section 8.1.19, ``sack_freq``) lets the packet count be set.
:class:`TunedSctp` acknowledges every ``sack_every``-th packet, or after :data:`ACK_DELAY_S`.
Four is the most that keeps a bulk sender busy: aiortc's sender sends at most four packets per
SACK it handles (RFC 9260's Max.Burst), so a receiver that waited for more would drain the
flight and fall back on its timer (measured: 0.8 MB/s at eight). Once a packet has revealed a
loss, the next :data:`RECOVERY_PACKETS` get a SACK per two, as the RFC has it: a recovering
sender's congestion window grows per SACK in slow start, and with a SACK per four packets a
1 MB message took 22-23 s instead of 15 s over a path losing 5 % each way with 50 ms delay.

**Larger DATA chunks.** aiortc cuts messages into 1,160-byte chunks, sized for the 1,280-byte
IPv6 minimum MTU. On an Ethernet LAN (1,500 bytes) a packet carries more: :func:`chunk_bytes`
derives the chunk from the path MTU, taking the largest IPv6 + UDP headers and the largest DTLS
record expansion of aiortc's cipher suites, and keeping each record within the 1,500 bytes that
aiortc reads per datagram. At 1,500 that is 1,356 bytes: 14 % fewer packets for the same data.

**One reassembly search per message.** After every DATA chunk aiortc walks the stream's whole
reassembly list looking for a complete message: n^2/2 steps for a message of n fragments (a
256 KiB frame is about 200). A chunk that lands at the tail of the list without the
last-fragment flag cannot complete any message (every message it belongs to still misses its
last fragment, and any other complete one was delivered when it completed), so
:class:`LinearInboundStream` skips the walk for it.

**Cheap in-order bookkeeping.** For every DATA chunk aiortc adds its TSN to a set, sorts the
set, and rebuilds the set and the duplicate list through filters, to learn that the chunk was
simply the next one. :meth:`TunedSctp._mark_received` advances the cumulative TSN directly in
that case (nothing missing, nothing duplicated). Every other case takes aiortc's steps in
serial-number order, and so do a SACK's gap blocks: aiortc sorts TSNs numerically, so a gap
pending across the TSN wrap-around (0 sorted before 2^32 - 1) stopped its cumulative TSN for
the rest of the association.

**Less Python per packet.** Profiled after the above (a sampling profiler on both ends of a
64 MiB transfer), aiortc's generic per-packet code came next: every packet parsed through the
generic chunk loop and a list of chunk objects, every chunk and SACK serialized through
intermediate copies with a debug log call, a walk over the whole sent queue (a congestion
window of chunks) on every SACK looking for chunks to retransmit, a cancelled and rescheduled
T3 timer on every SACK. :class:`TunedSctp` takes the common case directly and leaves every
other to aiortc: a packet holding one DATA chunk and nothing else, or one SACK reporting no
gap and no duplicate, is checked (length, checksum, verification tag) and parsed in place;
DATA chunks and SACKs without gaps or duplicates are packed directly (the same bytes:
tests/net/test_dtls.py); the retransmission walk runs only while a chunk can be marked for
it (after a SACK reporting gaps or a T3 expiry, until none is); a T3 restart that moves the
deadline later is recorded and the timer re-arms for the rest when it fires, and so does the
receiver's delayed-SACK timer (set once per delay, not set and cancelled per SACK); such a SACK,
outside fast recovery and with no FORWARD TSN under way, is handled by one method
(:meth:`TunedSctp._p2pfl_clean_sack`: aiortc's steps in aiortc's order, without a chunk
object, the gap handling and a helper call per acknowledged chunk; tests/net/test_dtls.py
compares the sender's state after it with aiortc's handling from the same states); and the
common DATA chunk of a transfer (the next TSN, not a message's last fragment, nothing missing,
no stream reset waiting) is received in one step (:meth:`TunedSctp._p2pfl_next_fragment`:
the cumulative TSN advanced, the chunk appended to its stream, no message search). These
repeat parts of aiortc's logic, so they are on only where the installed aiortc is a release
they were checked against (:data:`LEAN_AIORTC`).
The DTLS and ICE layers below get the same treatment in :mod:`p2pfl.daemon.dtls`. Together:
17 MB per CPU-second of the busier end before, 20-22 after (benchmarks/README.md).

**Bounded reassembly.** aiortc's receiver takes every new DATA chunk into its stream's
reassembly list, whatever the window it advertised and however many streams the chunks name:
a peer that sends fragments of one message and never its last one, complete messages whose
stream sequence never comes due, or chunks for thousands of stream ids, grows the receiver's
memory without bound (the data-channel layer above only ever sees complete messages). Here the
chunks held are counted (``_p2pfl_held``, kept by the streams as chunks enter and leave) beside
aiortc's own byte count (the window it advertises shrinks by every byte held). A new chunk out
of order is dropped, not marked received, once the bytes held would pass the advertised window,
past :data:`HOLD_CHUNKS` / 2 chunks, or more than :data:`HOLD_TSN_SPAN` TSNs ahead (a SACK's
gap blocks count in 16 bits: aiortc's SACK failed to pack for such a chunk, taking the link
down), as RFC 9260 section 6.2 has a receiver do with a full window; the sender sends it again
(aiortc's own sender does not keep to the peer's window, the tuned one does, see below; a peer
that does not can meet this: it costs a resend, never data). The next chunk in TSN order cannot
be dropped without stalling the association for good, so past the hard bound
(:data:`HOLD_BYTES`, :data:`HOLD_CHUNKS`: the window plus four messages of the 256 KiB aiortc
accepts, which a peer keeping to the protocol cannot reach) the association is aborted. A
chunk for a stream beyond :data:`HOLD_STREAMS` is refused the same way (a p2pfl link uses one
data channel), and so is a FORWARD TSN's entry for one (aiortc makes a stream for each, then
walks them all). A SACK's gap blocks are cut to the TSNs outstanding before aiortc walks them
offset by offset. Every refusal is reported with its reason (``tune(on_drop=...)``; the link
counts it as stage ``link``).

**The flight under delayed SACKs.** aiortc sends at most four of its chunks beyond the flight
left after a SACK (RFC 9260's Max.Burst, a SHOULD). That assumes a SACK every second packet:
with a SACK every :data:`SACK_EVERY` (4) packets, each SACK frees four packets and allows four,
so the flight stayed where it started and only grew by the bursts of newly queued messages,
whatever the congestion window. A fresh link sent a 16 MiB message at about half the rate of a
64 MiB one, still in slow start at its end (``bench_transport.py``). Here the burst counts four
chunks beyond the flight *and* what the SACK being handled acknowledged; the congestion window
bounds the flight as the RFC has it, and so does the peer's receive window (the a_rwnd of its
latest SACK; aiortc's sender ignores it, which did not matter while the flight stayed small).
Slow start is aiortc's (one chunk more per SACK while the window is used up). Only the lean
path (below) has this; aiortc's own ``_transmit``, which retransmissions and fast recovery
take, keeps its limit.

**Liveness below the frames.** Every packet from the peer stamps :func:`last_packet_at`, so a
link whose 256 KiB frame takes seconds to complete on a lossy path is not declared silent.

Applied per connection (:func:`tune`), by changing the class of the connection's own SCTP
transport before its association starts: no module of aiortc is altered, other users of aiortc
in the process are unaffected. The overrides replace private methods of aiortc
(``_handle_data``, ``_send_sack``, ``_send``, ``_send_chunk``, ``_transmit``,
``_receive_sack_chunk`` (bypassed for a clean SACK: it then uses ``_update_rto``,
``_update_advanced_peer_ack_point`` and ``_data_channel_flush``), ``_receive_data_chunk``
(bypassed for the next fragment, preceded by the reassembly bound; aborting uses ``_abort`` and
``_set_state``), the ``_t3_*`` timer methods, ``_get_inbound_stream``, ``_mark_received``,
``_reset_deferred_streams`` (to recount after a stream reset), ``_receive_forward_tsn_chunk``
(its streams bounded),
``InboundStream.add_chunk``/``pop_messages``/``prune_chunks``), extend the public ``stop``
(which ends the delayed-SACK timer and task with the association, so none outlives the link or
fails unseen after it) and use private attributes; :func:`tune` checks they exist and leaves
the transport as it is where an aiortc release has changed them. Each end still interoperates
with any SCTP peer: these are sender and receiver choices the protocol leaves open.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import typing
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import Any

from aiortc import RTCPeerConnection, RTCSctpTransport
from aiortc import rtcsctptransport as _sctp
from aiortc.utils import uint16_add, uint32_gt

from p2pfl.daemon._sctp_limits import SACK_EVERY

__all__ = [
    "ACK_DELAY_S",
    "HOLD_BYTES",
    "HOLD_CHUNKS",
    "HOLD_STREAMS",
    "HOLD_TSN_SPAN",
    "LEAN_AIORTC",
    "MIN_PATH_MTU",
    "RECOVERY_PACKETS",
    "SACK_EVERY",
    "LinearInboundStream",
    "TunedSctp",
    "aiortc_checked",
    "chunk_bytes",
    "last_packet_at",
    "tune",
]

LEAN_AIORTC = ("1.16",)  # aiortc releases whose SCTP code the fast paths were checked against
# SACK_EVERY (p2pfl.daemon._sctp_limits: the link settings need it without aiortc).
ACK_DELAY_S = 0.005  # a lone packet is acknowledged this late at most (the RFC allows 500 ms)
MIN_PATH_MTU = 1280  # IPv6's minimum: aiortc's own chunk size assumes it
RECOVERY_PACKETS = 256  # after a gap or a duplicate, this many packets get a SACK per two
HOLD_CHUNKS = 4096  # DATA chunks held for reassembly per association, at most
HOLD_BYTES = 2 * 1024 * 1024  # their bytes, at most: the 1 MiB window + 4 x 256 KiB messages
HOLD_STREAMS = 16  # inbound streams per association, at most (a link uses one data channel)
HOLD_TSN_SPAN = 65535  # a chunk held out of order is this far past the cumulative TSN at most
_MAX_BURST = 4  # new packets sent per event beyond those a SACK acknowledged (aiortc: 4 in all)

_IP_UDP_HEADERS = 40 + 8  # IPv6 (the larger of the two IP headers) + UDP
# DTLS 1.2 record expansion with ECDHE-ECDSA-AES128-SHA, the costliest suite aiortc offers:
# 13-byte header + 16-byte explicit IV + 20-byte MAC + up to 16 bytes of CBC padding.
_DTLS_EXPANSION = 13 + 16 + 20 + 16
_DTLS_READ_LIMIT = 1500  # aiortc reads each DTLS record and its plaintext into 1,500 bytes
_SCTP_HEADERS = 12 + 16  # common header + DATA chunk header

log = logging.getLogger(__name__)

_REQUIRED = (
    "_handle_data",
    "_send",
    "_send_sack",
    "_transmit",
    "_get_inbound_stream",
    "_sack_misordered",
    "_sack_duplicates",
    "_sack_needed",
    "_outbound_queue",
    "_outbound_stream_seq",
    "_local_tsn",
    "_mark_received",
    "_last_received_tsn",
    "_local_verification_tag",
    "_remote_verification_tag",
    "_local_port",
    "_remote_port",
    "_receive_data_chunk",
    "_advertised_rwnd",
    "_receive_sack_chunk",
    "_send_chunk",
    "_t3_expired",
    "_t3_start",
    "_t3_restart",
    "_t3_cancel",
    "_rto",
    "_loop",
    "_t3_handle",
    "_sent_queue",
    "_flight_size",
    "_cwnd",
    "_fast_recovery_exit",
    "_forward_tsn_chunk",
    "_forward_tsn_streams",
    "_inbound_streams",
    "_reconfig_deferred",
    "_reset_deferred_streams",
    "_receive_forward_tsn_chunk",
    "_association_state",
    "_abort",
    "_set_state",
    "_advanced_peer_ack_tsn",
    "_last_sacked_tsn",
    "_update_advanced_peer_ack_point",
    "_data_channel_queue",
    "_data_channel_flush",
    "_update_rto",
    "_partial_bytes_acked",
    "transport",
)
_FIRST_FRAGMENT: int = getattr(_sctp, "SCTP_DATA_FIRST_FRAG", 0)
_LAST_FRAGMENT: int = getattr(_sctp, "SCTP_DATA_LAST_FRAG", 0)
_UNORDERED: int = getattr(_sctp, "SCTP_DATA_UNORDERED", 0)
_InboundStream: Any = getattr(_sctp, "InboundStream", None)
_AIORTC_CHUNK: int = getattr(_sctp, "USERDATA_MAX_LENGTH", 0)
_crc32c: Any = getattr(_sctp, "crc32c", None)
_COMMON_HEADER = struct.Struct("!HHL")  # source port, destination port, verification tag
_CHECKSUM = struct.Struct("<L")
_DATA_HEADER = struct.Struct("!BBHLHHL")  # type, flags, length, TSN, stream, sequence, PPID
_DATA_PACKET_MIN = _COMMON_HEADER.size + _CHECKSUM.size + _DATA_HEADER.size
_SACK = struct.Struct("!BBHLLHH")  # type, flags, length, cumulative TSN, a_rwnd, #gaps, #dups
_SACK_TYPE = 3
_SACK_PACKET = _COMMON_HEADER.size + _CHECKSUM.size + _SACK.size  # one SACK, no gap or duplicate
_ZERO_CHECKSUM = bytes(4)
_DATA_TYPE = 0
_TSN_MODULO = 2**32
_Block = tuple[int, int]  # a SACK's gap block: first and last TSN as offsets from its cumulative
_HALF_TSN = 2**31
_WINDOW = 1024 * 1024  # aiortc's advertised window with nothing held; tune() reads the instance's


def _merged_blocks(blocks: Iterable[_Block]) -> list[_Block]:
    """Gap blocks sorted, empty ones (start past end) left out, overlapping or adjacent ones
    joined."""
    merged: list[_Block] = []
    for start, end in sorted(blocks):
        if start > end:
            continue
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _packet(header: bytes, chunks: bytes) -> bytes:
    """A packet: the common ``header`` (checksum excluded), its CRC32c, the serialized, padded
    ``chunks``."""
    return header + _CHECKSUM.pack(_crc32c(header + _ZERO_CHECKSUM + chunks)) + chunks


def chunk_bytes(path_mtu: int) -> int:
    """The user data one DATA chunk carries so that its packet crosses a ``path_mtu`` path."""
    if path_mtu < MIN_PATH_MTU:
        raise ValueError(f"path MTU {path_mtu} is below IPv6's minimum of {MIN_PATH_MTU}")
    record = min(path_mtu - _IP_UDP_HEADERS, _DTLS_READ_LIMIT)
    return (record - _DTLS_EXPANSION - _SCTP_HEADERS) // 4 * 4


class LinearInboundStream(_InboundStream or object):  # type: ignore[misc]
    """aiortc's reassembly, skipping the search after a tail chunk that ends no message; the
    chunks it holds are counted in its association's ``_p2pfl_held``."""

    _p2pfl_skip = False
    _p2pfl_owner: TunedSctp | None = None

    def add_chunk(self, chunk: Any) -> None:
        tail = not self.reassembly or uint32_gt(chunk.tsn, self.reassembly[-1].tsn)
        self._p2pfl_skip = bool(tail and not chunk.flags & _LAST_FRAGMENT)
        super().add_chunk(chunk)
        if self._p2pfl_owner is not None:
            self._p2pfl_owner._p2pfl_held += 1

    def pop_messages(self) -> Any:
        if self._p2pfl_skip:
            self._p2pfl_skip = False
            return iter(())
        if self._p2pfl_owner is None:
            return super().pop_messages()
        return self._p2pfl_counted(super().pop_messages())

    def _p2pfl_counted(self, messages: Any) -> Any:
        """``messages`` (aiortc's, each taken out of the list before it is yielded), with the
        chunks each took out subtracted from the association's count."""
        owner = self._p2pfl_owner
        held = len(self.reassembly)
        for message in messages:
            if owner is not None:
                owner._p2pfl_held -= held - len(self.reassembly)
            held = len(self.reassembly)
            yield message

    def prune_chunks(self, tsn: int) -> int:
        held = len(self.reassembly)
        size = int(super().prune_chunks(tsn))
        if self._p2pfl_owner is not None:
            self._p2pfl_owner._p2pfl_held -= held - len(self.reassembly)
        return size


class TunedSctp(RTCSctpTransport):
    """aiortc's SCTP transport with fewer SACKs, larger chunks and linear reassembly."""

    # Class-level defaults: instances get here by a class change, without __init__; tune()
    # sets the two settings on the instance.
    _p2pfl_sack_every = SACK_EVERY
    _p2pfl_chunk = _AIORTC_CHUNK
    _p2pfl_unacked = 0
    _p2pfl_timer: asyncio.TimerHandle | None = None
    _p2pfl_ack_due = 0.0  # loop time the held packets must be acknowledged by; 0: none held
    _p2pfl_ack_task: asyncio.Future[None] | None = None
    _p2pfl_heard = 0.0
    _p2pfl_recovery = 0  # packets left to acknowledge every second one
    _p2pfl_lean = False  # the per-packet fast paths (see "Less Python per packet")
    _p2pfl_held = 0  # DATA chunks held for reassembly, all streams (see "Bounded reassembly")
    _p2pfl_window = _WINDOW  # the receive window aiortc advertises when nothing is held
    _p2pfl_on_drop: Callable[[str], None] | None = None
    _p2pfl_aborted = False  # the bound aborted the association
    _p2pfl_acked = 0  # bytes the SACK being handled acknowledged (the next burst's allowance)
    _p2pfl_peer_window: int | None = None  # the a_rwnd of the peer's latest SACK

    # --- liveness ------------------------------------------------------------------------------
    async def _handle_data(self, data: bytes) -> None:
        # Every packet from the peer (DTLS has authenticated it) shows it is alive, also while
        # a large data-channel message is still incomplete on a slow, lossy path.
        self._p2pfl_heard = time.monotonic()
        if self._p2pfl_aborted:
            return  # aborted here (see "Bounded reassembly"): nothing more is taken
        if not self._p2pfl_lean:
            await super()._handle_data(data)
            return
        chunk = self._p2pfl_lone_data_chunk(data)
        if chunk is not None:
            if not self._p2pfl_next_fragment(chunk):
                await self._receive_data_chunk(chunk)
        else:
            sack = self._p2pfl_lone_sack(data)
            if sack is None:
                await super()._handle_data(data)
                return
            if not await self._p2pfl_clean_sack(sack[1], sack[2]):
                await self._receive_sack_chunk(self._p2pfl_sack_chunk(*sack))
        if self._sack_needed:
            await self._send_sack()

    def _p2pfl_lone_sack(self, data: bytes) -> tuple[int, int, int] | None:
        """(flags, cumulative TSN, a_rwnd) of a packet that holds one SACK reporting no gap and
        no duplicate (every SACK of a clean transfer) and nothing else, checked as aiortc checks
        it; None for any other packet, which aiortc's ``_handle_data`` then parses and handles."""
        if len(data) != _SACK_PACKET or data[12] != _SACK_TYPE:
            return None
        _, flags, length, cumulative_tsn, rwnd, gaps, duplicates = _SACK.unpack_from(data, 12)
        if length != _SACK.size or gaps or duplicates:
            return None
        if not self._p2pfl_ours(data):
            return None
        return flags, cumulative_tsn, rwnd

    def _p2pfl_ours(self, data: bytes) -> bool:
        """Whether a packet's checksum is right and its verification tag this association's,
        as aiortc checks them."""
        if _CHECKSUM.unpack_from(data, 8)[0] != _crc32c(data[:8] + _ZERO_CHECKSUM + data[12:]):
            return False
        return bool(_COMMON_HEADER.unpack_from(data)[2] == self._local_verification_tag)

    @staticmethod
    def _p2pfl_sack_chunk(flags: int, cumulative_tsn: int, rwnd: int) -> Any:
        """The SackChunk aiortc's parse makes of a SACK without gaps or duplicates."""
        sack = _sctp.SackChunk(flags)
        sack.cumulative_tsn = cumulative_tsn
        sack.advertised_rwnd = rwnd
        return sack

    def _p2pfl_lone_data_chunk(self, data: bytes) -> Any:
        """The DATA chunk of a packet that holds one DATA chunk and nothing else, checked as
        aiortc checks it (length, checksum, verification tag); None for any other packet,
        which aiortc's ``_handle_data`` then parses, checks and drops or handles itself."""
        if len(data) < _DATA_PACKET_MIN or data[12] != _DATA_TYPE:
            return None
        _, flags, length, tsn, stream_id, stream_seq, protocol = _DATA_HEADER.unpack_from(data, 12)
        if length < _DATA_HEADER.size or 12 + length + (-length % 4) != len(data):
            return None
        if not self._p2pfl_ours(data):
            return None
        chunk = _sctp.DataChunk()
        chunk.flags = flags
        chunk.tsn = tsn
        chunk.stream_id = stream_id
        chunk.stream_seq = stream_seq
        chunk.protocol = protocol
        chunk.user_data = data[_DATA_PACKET_MIN : 12 + length]
        return chunk

    # --- receiving: fewer SACKs, one reassembly search per message -----------------------------
    async def _send_sack(self) -> None:
        urgent = bool(self._sack_misordered or self._sack_duplicates)
        every = self._p2pfl_sack_every
        if urgent:
            self._p2pfl_recovery = RECOVERY_PACKETS
        elif self._p2pfl_recovery > 0:
            self._p2pfl_recovery -= 1
            every = min(every, 2)
        if not urgent and self._p2pfl_unacked + 1 < every:
            self._p2pfl_unacked += 1
            if not self._p2pfl_ack_due:
                # The first packet held since the last SACK sets the deadline. A timer still
                # pending fires before it and re-arms for the rest: one timer per delay in a
                # transfer, not one set and cancelled per SACK.
                loop: Any = self._loop
                self._p2pfl_ack_due = due = loop.time() + ACK_DELAY_S
                if self._p2pfl_timer is None:
                    self._p2pfl_timer = loop.call_at(due, self._p2pfl_deadline)
            return
        await self._p2pfl_ack_now()

    def _mark_received(self, tsn: int) -> bool:
        # The common case, the next TSN with nothing missing or duplicated: aiortc's bookkeeping
        # (a set, a sort and two filters per chunk) comes to advancing the cumulative TSN.
        if (
            self._p2pfl_lean
            and not self._sack_misordered
            and not self._sack_duplicates
            and self._last_received_tsn is not None
            and tsn == (self._last_received_tsn + 1) % _TSN_MODULO
        ):
            self._last_received_tsn = tsn
            return False
        last = self._last_received_tsn
        if last is None:
            return bool(super()._mark_received(tsn))
        # aiortc's bookkeeping in serial-number order: aiortc consolidates the received TSNs
        # in numeric order, so with a gap pending across the wrap-around (0 sorted before
        # 2^32 - 1) the cumulative TSN stopped for the rest of the association.
        misordered = self._sack_misordered
        if (last - tsn) % _TSN_MODULO < _HALF_TSN or tsn in misordered:
            self._sack_duplicates.append(tsn)
            return True
        misordered.add(tsn)
        following = (last + 1) % _TSN_MODULO
        while following in misordered:
            last, following = following, (following + 1) % _TSN_MODULO
        self._last_received_tsn = last
        self._sack_duplicates = [
            x for x in self._sack_duplicates if 0 < (x - last) % _TSN_MODULO < _HALF_TSN
        ]
        self._sack_misordered = {x for x in misordered if 0 < (x - last) % _TSN_MODULO < _HALF_TSN}
        return False

    def _p2pfl_next_fragment(self, chunk: Any) -> bool:
        """aiortc's ``_receive_data_chunk`` for the common DATA chunk of a transfer: the next
        TSN, nothing missing or duplicated, not the last fragment of its message, its stream's
        reassembly already linear (:class:`LinearInboundStream`), no stream reset waiting. It
        comes to: SACK needed, the cumulative TSN advanced, the chunk appended to its stream,
        the window shrunk (no message can complete: the stream skips its search). False, having
        done nothing, for any other chunk: aiortc's method then handles it."""
        tsn = chunk.tsn
        last = self._last_received_tsn
        if (
            chunk.flags & _LAST_FRAGMENT
            or last is None
            or tsn != (last + 1) % _TSN_MODULO
            or self._sack_misordered
            or self._sack_duplicates
            or self._reconfig_deferred is not None
        ):
            return False
        stream = self._inbound_streams.get(chunk.stream_id)
        if type(stream) is not LinearInboundStream:
            return False
        if self._p2pfl_past_hold(len(chunk.user_data)):
            return False  # over the bound: _receive_data_chunk refuses it
        reassembly = stream.reassembly
        # The tail, as add_chunk checks: every chunk held has a TSN up to the cumulative one.
        if reassembly and not 0 < (tsn - reassembly[-1].tsn) % _TSN_MODULO < _HALF_TSN:
            return False
        self._sack_needed = True
        self._last_received_tsn = tsn
        reassembly.append(chunk)
        self._p2pfl_held += 1
        self._advertised_rwnd -= len(chunk.user_data)
        return True

    def _get_inbound_stream(self, stream_id: int) -> Any:
        stream = super()._get_inbound_stream(stream_id)
        if type(stream) is _InboundStream:
            stream.__class__ = LinearInboundStream
            typing.cast(LinearInboundStream, stream)._p2pfl_owner = self
        return stream

    # --- bounded reassembly ---------------------------------------------------------------------
    async def _receive_data_chunk(self, chunk: Any) -> None:
        if self._p2pfl_aborted:
            return  # the rest of a packet whose chunk aborted the association
        refused = self._p2pfl_refusal(chunk)
        if refused is None:
            await super()._receive_data_chunk(chunk)
            return
        if self._p2pfl_on_drop is not None:
            self._p2pfl_on_drop(refused)
        last = self._last_received_tsn  # set: only a chunk after it can be refused
        if last is not None and chunk.tsn == (last + 1) % _TSN_MODULO:
            # The next TSN cannot be dropped without stalling the association for good (the
            # peer must send it again, and it would be refused again): a peer keeping to the
            # protocol never sends it over the bound.
            self._p2pfl_aborted = True
            await self._abort()
            self._set_state(self.State.CLOSED)

    def _p2pfl_refusal(self, chunk: Any) -> str | None:
        """Why a DATA chunk is not taken in (see "Bounded reassembly"); None to take it. A
        duplicate is taken: aiortc reports it and holds nothing."""
        tsn = chunk.tsn
        last = self._last_received_tsn
        if last is None or (last - tsn) % _TSN_MODULO < _HALF_TSN or tsn in self._sack_misordered:
            return None
        streams = self._inbound_streams
        if chunk.stream_id not in streams and len(streams) >= HOLD_STREAMS:
            return "sctp_streams_full"
        size = len(chunk.user_data)
        if tsn == (last + 1) % _TSN_MODULO:
            if self._p2pfl_past_hold(size):
                return "sctp_reassembly_full"
        elif (
            self._p2pfl_held >= HOLD_CHUNKS // 2
            or size > self._advertised_rwnd  # past the window it advertised
            or (tsn - last) % _TSN_MODULO > HOLD_TSN_SPAN
        ):
            return "sctp_window_full"  # out of order: the peer sends it again
        return None

    def _p2pfl_past_hold(self, size: int) -> bool:
        """Whether a chunk of ``size`` bytes taken in now would pass the hard bound: more than
        :data:`HOLD_CHUNKS` chunks or :data:`HOLD_BYTES` bytes held (aiortc's window shrinks by
        every byte held)."""
        held_bytes = self._p2pfl_window - self._advertised_rwnd + size
        return self._p2pfl_held >= HOLD_CHUNKS or held_bytes > HOLD_BYTES

    async def _receive_forward_tsn_chunk(self, chunk: Any) -> None:
        # aiortc makes an inbound stream for every stream a FORWARD TSN names, and then walks
        # them all on every FORWARD TSN: the stream bound holds here too.
        streams = self._inbound_streams
        room = HOLD_STREAMS - len(streams)
        kept = []
        for stream_id, stream_seq in chunk.streams:
            if stream_id not in streams:
                if room <= 0:
                    continue
                room -= 1
            kept.append((stream_id, stream_seq))
        if len(kept) < len(chunk.streams) and self._p2pfl_on_drop is not None:
            self._p2pfl_on_drop("sctp_streams_full")
        chunk.streams = kept
        await super()._receive_forward_tsn_chunk(chunk)

    async def _reset_deferred_streams(self) -> None:
        deferred = self._reconfig_deferred
        await super()._reset_deferred_streams()
        if deferred is not None and self._reconfig_deferred is None:
            # Streams were reset: their chunks went with them.
            self._p2pfl_held = sum(len(s.reassembly) for s in self._inbound_streams.values())

    async def _p2pfl_ack_now(self) -> None:
        self._p2pfl_ack_due = 0.0  # a pending timer finds nothing held and stops
        self._p2pfl_unacked = 0
        await self._p2pfl_sack()

    async def _p2pfl_sack(self) -> None:
        """Send a SACK now: aiortc's ``_send_sack``."""
        if self._sack_misordered or self._sack_duplicates:
            await self._p2pfl_gap_sack()
            return
        if not self._p2pfl_lean:
            await super()._send_sack()
            return
        # Nothing missing or duplicated (every SACK of a clean transfer): aiortc's SACK, with
        # no gap or duplicate, packed directly.
        sack = _SACK.pack(
            _SACK_TYPE,
            0,
            _SACK.size,
            self._last_received_tsn,
            max(0, self._advertised_rwnd),
            0,
            0,
        )
        await self._p2pfl_send_packet(sack)
        self._sack_needed = False

    async def _p2pfl_gap_sack(self) -> None:
        """aiortc's ``_send_sack`` with its gap blocks in serial-number order: aiortc sorts the
        TSNs numerically, which across the wrap-around reports blocks out of order and splits
        the one that crosses it."""
        last = self._last_received_tsn
        if last is None:  # nothing received yet: nothing to report
            await super()._send_sack()
            return
        offsets = ((tsn - last) % _TSN_MODULO for tsn in self._sack_misordered)
        sack = _sctp.SackChunk()
        sack.cumulative_tsn = last
        sack.advertised_rwnd = max(0, self._advertised_rwnd)
        sack.duplicates = self._sack_duplicates[:]
        sack.gaps = _merged_blocks((offset, offset) for offset in offsets)
        await self._send_chunk(sack)
        self._sack_duplicates.clear()
        self._sack_needed = False

    def _p2pfl_deadline(self) -> None:
        self._p2pfl_timer = None
        due = self._p2pfl_ack_due
        if not due:
            return  # acknowledged since the timer was set
        loop: Any = self._loop
        if loop.time() < due:  # set for packets acknowledged since: re-armed for the rest
            self._p2pfl_timer = loop.call_at(due, self._p2pfl_deadline)
            return
        self._p2pfl_ack_due = 0.0
        if self._sack_needed and self._association_state == self.State.ESTABLISHED:
            # Held so the task is not collected before it runs; cancelled by stop().
            task = asyncio.ensure_future(self._p2pfl_ack_now())
            task.add_done_callback(_ack_done)
            self._p2pfl_ack_task = task
        else:
            self._p2pfl_unacked = 0

    async def stop(self) -> None:
        self._p2pfl_ack_due = 0.0
        if self._p2pfl_timer is not None:
            self._p2pfl_timer.cancel()
            self._p2pfl_timer = None
        task, self._p2pfl_ack_task = self._p2pfl_ack_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        await super().stop()

    # --- sending: lean packets, a retransmission scan only when one can be due -----------------
    _p2pfl_scan = True  # a chunk in the sent queue may be marked for retransmission

    async def _send_chunk(self, chunk: Any) -> None:
        if type(chunk) is not _sctp.DataChunk or not self._p2pfl_lean:
            await super()._send_chunk(chunk)
            return
        await self.transport._send_data(self._p2pfl_data_packet(chunk, self._p2pfl_header()))

    def _p2pfl_header(self) -> bytes:
        """The common header of this association's packets, checksum excluded."""
        return _COMMON_HEADER.pack(
            self._local_port, self._remote_port, self._remote_verification_tag
        )

    @staticmethod
    def _p2pfl_data_packet(chunk: Any, header: bytes) -> bytes:
        """serialize_packet's bytes for one DATA chunk, built without its intermediate copies
        and debug logging."""
        user_data = chunk.user_data
        length = _DATA_HEADER.size + len(user_data)
        body = (
            _DATA_HEADER.pack(
                _DATA_TYPE,
                chunk.flags,
                length,
                chunk.tsn,
                chunk.stream_id,
                chunk.stream_seq,
                chunk.protocol,
            )
            + user_data
            + bytes(-length % 4)
        )
        return _packet(header, body)

    async def _p2pfl_send_packet(self, chunks: bytes) -> None:
        """serialize_packet's bytes for ``chunks`` (serialized, padded), built without its
        intermediate copies and debug logging, handed to DTLS as aiortc's ``_send_chunk`` does."""
        await self.transport._send_data(_packet(self._p2pfl_header(), chunks))

    async def _receive_sack_chunk(self, chunk: Any) -> None:
        if not uint32_gt(self._last_sacked_tsn, chunk.cumulative_tsn):  # not an old SACK
            self._p2pfl_peer_window = chunk.advertised_rwnd
        if chunk.gaps:  # only gap reports strike chunks for retransmission
            self._p2pfl_scan = True
            chunk.gaps = self._p2pfl_gaps(chunk.cumulative_tsn, chunk.gaps)
        await super()._receive_sack_chunk(chunk)

    def _p2pfl_gaps(self, cumulative_tsn: int, gaps: list[tuple[int, int]]) -> list[_Block]:
        """A SACK's gap blocks cut to the TSNs outstanding (1 .. the last sent, as offsets from
        ``cumulative_tsn``), in order and merged. aiortc walks every offset of every block: a
        peer's blocks of 0..65535, a few hundred to a packet, held the event loop for seconds
        (every link of the node). Blocks past the outstanding TSNs are reported as
        ``sctp_sack_out_of_range`` (a peer keeping to the protocol reports only what it got)."""
        sent = self._sent_queue
        span = (sent[-1].tsn - cumulative_tsn) % _TSN_MODULO if sent else 0
        if span >= _HALF_TSN:
            span = 0  # nothing outstanding past this cumulative TSN
        merged = _merged_blocks((max(start, 1), min(end, span)) for start, end in gaps)
        last_sacked = self._last_sacked_tsn
        current = (cumulative_tsn - last_sacked) % _TSN_MODULO < _HALF_TSN
        if (
            current
            and self._p2pfl_on_drop is not None
            and any(not 1 <= start <= end <= span for start, end in gaps)
        ):
            self._p2pfl_on_drop("sctp_sack_out_of_range")
        return merged

    async def _p2pfl_clean_sack(self, cumulative_tsn: int, rwnd: int) -> bool:
        """aiortc's ``_receive_sack_chunk`` for a SACK without gaps or duplicates (every SACK
        of a clean transfer) outside fast recovery and with no FORWARD TSN under way: the
        acknowledged chunks leave the sent queue and the flight, the first one's round trip
        updates the RTO, the congestion window grows, T3 restarts or stops, more is sent. The
        same steps in the same order as aiortc's, without its gap handling, per-chunk helper
        calls and the FORWARD TSN bookkeeping, which has nothing to do here. False, having
        done nothing, in any other state: aiortc's method then handles the SACK. ``rwnd``, the
        SACK's a_rwnd, bounds the flight (see "The flight under delayed SACKs")."""
        if (
            self._fast_recovery_exit is not None
            or self._forward_tsn_chunk is not None
            or self._forward_tsn_streams
            or self._advanced_peer_ack_tsn != self._last_sacked_tsn
        ):
            return False
        last = self._last_sacked_tsn
        # uint32_gt(a, b), aiortc's serial number comparison: 0 < (a - b) mod 2^32 < 2^31.
        if 0 < (last - cumulative_tsn) % _TSN_MODULO < _HALF_TSN:
            return True  # an old SACK: aiortc ignores it
        received_time = time.time()
        self._last_sacked_tsn = cumulative_tsn
        self._p2pfl_peer_window = rwnd
        if 0 < (cumulative_tsn - last) % _TSN_MODULO < _HALF_TSN:
            self._advanced_peer_ack_tsn = cumulative_tsn  # it was last, as checked above
        flight = self._flight_size
        cwnd_fully_utilized = flight >= self._cwnd
        done = 0
        done_bytes = 0
        sent: Any = self._sent_queue
        # uint32_gte(cumulative_tsn, tsn): (cumulative_tsn - tsn) mod 2^32 below 2^31.
        while sent and (cumulative_tsn - sent[0].tsn) % _TSN_MODULO < _HALF_TSN:
            schunk = sent.popleft()
            done += 1
            if not schunk._acked:
                done_bytes += schunk._book_size
            if schunk._in_flight:  # aiortc's _flight_size_decrease
                schunk._in_flight = False
                flight -= schunk._book_size
            if done == 1 and schunk._sent_count == 1:
                self._update_rto(received_time - schunk._sent_time)
        self._flight_size = flight
        self._p2pfl_acked = done_bytes
        if done and cwnd_fully_utilized:
            if self._cwnd <= self._ssthresh:
                self._cwnd += min(done_bytes, _AIORTC_CHUNK)  # slow start
            else:  # congestion avoidance
                self._partial_bytes_acked += done_bytes
                if self._partial_bytes_acked >= self._cwnd:
                    self._partial_bytes_acked -= self._cwnd
                    self._cwnd += _AIORTC_CHUNK
        if not sent:
            self._t3_cancel()  # no outstanding data
        elif done:
            self._t3_restart()  # the earliest outstanding chunk was acknowledged
        outbound = self._outbound_queue
        if (outbound and outbound[0]._abandoned) or (sent and sent[0]._abandoned):
            self._update_advanced_peer_ack_point()  # abandoned chunks: aiortc's FORWARD TSN
        if self._data_channel_queue and not outbound:  # else aiortc's flush does nothing
            await self._data_channel_flush()
        await self._transmit()
        return True

    # T3, the retransmission timer, is restarted on every SACK that acknowledges new data:
    # aiortc cancels the timer and schedules a new one each time. Here a restart that only
    # moves the deadline later records it; the timer, when it fires, re-arms for the rest.
    _p2pfl_t3_due = 0.0  # loop time the running T3 is due at, if later than its timer; else 0

    def _t3_restart(self) -> None:
        handle = self._t3_handle
        loop: Any = self._loop
        due = loop.time() + self._rto
        if handle is not None and self._p2pfl_lean and handle.when() <= due:
            self._p2pfl_t3_due = due
            return
        self._p2pfl_t3_due = 0.0
        super()._t3_restart()

    def _t3_start(self) -> None:
        self._p2pfl_t3_due = 0.0
        super()._t3_start()

    def _t3_cancel(self) -> None:
        self._p2pfl_t3_due = 0.0
        super()._t3_cancel()

    def _t3_expired(self) -> None:
        due = self._p2pfl_t3_due
        loop: Any = self._loop
        if due > loop.time():
            self._t3_handle = loop.call_at(due, self._t3_expired)
            return
        self._p2pfl_t3_due = 0.0
        self._p2pfl_scan = True  # marks every outstanding chunk for retransmission
        super()._t3_expired()

    async def _transmit(self) -> None:
        """aiortc's ``_transmit``, without its walk over the whole sent queue looking for chunks
        to retransmit (per SACK: the sent queue holds a congestion window of chunks) while none
        can be marked; aiortc's own whenever a retransmission, a FORWARD TSN or fast recovery
        is under way."""
        if (
            self._p2pfl_scan
            or not self._p2pfl_lean
            or self._forward_tsn_chunk is not None
            or self._fast_recovery_exit is not None
        ):
            await super()._transmit()
            self._p2pfl_scan = any(chunk._retransmit for chunk in self._sent_queue)
            return
        # See "The flight under delayed SACKs": four chunks beyond the flight and what the SACK
        # just acknowledged, within the congestion window and the peer's receive window (one
        # chunk may always be in flight, RFC 9260 section 6.1 rule A: a zero window's probe).
        acked, self._p2pfl_acked = self._p2pfl_acked, 0
        cwnd = min(self._flight_size + acked + _MAX_BURST * self._p2pfl_chunk, self._cwnd)
        if self._p2pfl_peer_window is not None:  # None before the first SACK
            cwnd = min(cwnd, max(self._p2pfl_peer_window, 1))
        outbound, sent = self._outbound_queue, self._sent_queue
        if not outbound or self._flight_size >= cwnd:
            return
        now = time.time()
        # Every queued chunk is a DATA chunk: packed here as _send_chunk packs it, handed to
        # DTLS directly.
        header = self._p2pfl_header()
        send = self.transport._send_data
        while outbound and self._flight_size < cwnd:
            chunk = outbound.popleft()
            sent.append(chunk)
            if not chunk._in_flight:
                chunk._in_flight = True
                self._flight_size += chunk._book_size
            chunk._sent_count += 1
            chunk._sent_time = now
            await send(self._p2pfl_data_packet(chunk, header))
            if not self._t3_handle:
                self._t3_start()

    # --- sending: chunks sized for the path ----------------------------------------------------
    async def _send(
        self,
        stream_id: int,
        pp_id: int,
        user_data: bytes,
        expiry: float | None = None,
        max_retransmits: int | None = None,
        ordered: bool = True,
    ) -> None:
        """Cut one message into DATA chunks of ``_p2pfl_chunk`` bytes, queue them, transmit.

        The chunks are those aiortc's ``_send`` makes (flags, stream sequence, bookkeeping),
        only longer; tests/net/test_sctp.py checks that at aiortc's own chunk size.
        """
        size = self._p2pfl_chunk
        sequence = self._outbound_stream_seq.get(stream_id, 0) if ordered else 0
        count = -(-len(user_data) // size)
        for index in range(count):
            chunk = _sctp.DataChunk()
            chunk.flags = 0 if ordered else _UNORDERED
            if index == 0:
                chunk.flags |= _FIRST_FRAGMENT
            if index == count - 1:
                chunk.flags |= _LAST_FRAGMENT
            chunk.tsn = self._local_tsn
            chunk.stream_id = stream_id
            chunk.stream_seq = sequence
            chunk.protocol = pp_id
            chunk.user_data = user_data[index * size : (index + 1) * size]
            # The sender's bookkeeping, as aiortc keeps it on its chunks.
            chunk._abandoned = False
            chunk._acked = False
            chunk._book_size = len(chunk.user_data)
            chunk._expiry = expiry
            chunk._in_flight = False
            chunk._max_retransmits = max_retransmits
            chunk._misses = 0
            chunk._retransmit = False
            chunk._sent_count = 0
            chunk._sent_time = None
            self._local_tsn = (self._local_tsn + 1) % _TSN_MODULO  # aiortc's tsn_plus_one
            self._outbound_queue.append(chunk)
        if ordered:
            self._outbound_stream_seq[stream_id] = uint16_add(sequence, 1)
        await self._transmit()


def _ack_done(task: asyncio.Future[None]) -> None:
    """Retrieve a delayed SACK's outcome: the link closing under it is no error."""
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, ConnectionError):  # DTLS closed first: "Cannot send encrypted data"
        log.debug("delayed SACK after the link closed", extra={"error": str(exc)})
    elif exc is not None:
        log.warning("delayed SACK failed", exc_info=exc)


def last_packet_at(pc: RTCPeerConnection) -> float:
    """``time.monotonic()`` when ``pc``'s SCTP last received a packet; 0.0 if never or untuned."""
    return float(getattr(pc.sctp, "_p2pfl_heard", 0.0))


def tune(
    pc: RTCPeerConnection,
    *,
    sack_every: int = SACK_EVERY,
    path_mtu: int = 1500,
    lean: bool | None = None,
    on_drop: Callable[[str], None] | None = None,
) -> bool:
    """Make ``pc``'s SCTP transport a :class:`TunedSctp`; False where it cannot.

    ``sack_every``: data packets per SACK (1: every packet, as aiortc does); ``path_mtu``: the
    largest IP packet the path between the nodes carries (:data:`MIN_PATH_MTU` or more). Call
    after the transport exists (``createDataChannel`` on the offering side,
    ``setRemoteDescription`` on the answering side) and before the association starts.
    ``lean``: the per-packet fast paths, which repeat parts of aiortc's own logic; by default
    on where the installed aiortc is a release they were checked against
    (:data:`LEAN_AIORTC`). ``on_drop(reason)`` is called, on the asyncio thread, for each DATA
    chunk the bounded reassembly refuses (``sctp_window_full``, ``sctp_streams_full``,
    ``sctp_reassembly_full``); a refused chunk that is the next in TSN order also aborts the
    association.
    """
    if not 1 <= sack_every <= SACK_EVERY:
        raise ValueError(f"sack_every must be 1..{SACK_EVERY}, not {sack_every}")
    size = chunk_bytes(path_mtu)
    sctp: Any = pc.sctp
    if sctp is None or type(sctp) is not RTCSctpTransport:
        return False
    if not all(hasattr(sctp, name) for name in _REQUIRED):
        return False
    if not (_FIRST_FRAGMENT and _LAST_FRAGMENT and _UNORDERED and _AIORTC_CHUNK):
        return False
    if _InboundStream is None or not all(
        hasattr(_InboundStream, name) for name in ("add_chunk", "pop_messages", "prune_chunks")
    ):
        return False
    if _crc32c is None or not all(
        hasattr(_sctp, name) for name in ("DataChunk", "SackChunk", "tsn_plus_one")
    ):
        return False
    sctp.__class__ = TunedSctp
    tuned = typing.cast(TunedSctp, sctp)
    tuned._p2pfl_sack_every = sack_every
    tuned._p2pfl_chunk = size
    tuned._p2pfl_lean = aiortc_checked() if lean is None else lean
    tuned._p2pfl_window = max(tuned._advertised_rwnd, 0)  # nothing is held yet
    tuned._p2pfl_on_drop = on_drop
    return True


def aiortc_checked() -> bool:
    """Whether the installed aiortc is a release the fast paths were checked against."""
    try:
        installed = _version("aiortc")
    except PackageNotFoundError:
        return False
    return any(installed == r or installed.startswith(r + ".") for r in LEAN_AIORTC)
