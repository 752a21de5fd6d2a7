"""Fewer SACKs, larger chunks and linear reassembly on top of aiortc's SCTP (p2pfl.daemon.sctp).

Reassembly is checked against aiortc's own InboundStream on random fragment streams, lost and
reordered chunks included; fragmentation against aiortc's own ``_send`` at its chunk size; the
acknowledgement rule on a real, unconnected aiortc transport whose SACK sender is counted. The
end-to-end transfers in test_transport.py and test_failures.py (loss and delay included) run with
all of it in place, as every link does by default.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from aiortc import RTCPeerConnection, RTCSctpTransport
from aiortc import rtcsctptransport as aiortc_sctp
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.daemon import sctp
from p2pfl.daemon.datachannel import LinkSettings

FIRST, LAST, UNORDERED = (
    aiortc_sctp.SCTP_DATA_FIRST_FRAG,
    aiortc_sctp.SCTP_DATA_LAST_FRAG,
    aiortc_sctp.SCTP_DATA_UNORDERED,
)


def _chunks(sizes: list[int], unordered: list[bool], start_tsn: int) -> list[object]:
    """The DATA chunks aiortc's sender makes for messages of ``sizes`` fragments."""
    chunks = []
    tsn = start_tsn
    seq = 0
    for n, loose in zip(sizes, unordered, strict=True):
        for i in range(n):
            chunk = aiortc_sctp.DataChunk()
            chunk.flags = (FIRST if i == 0 else 0) | (LAST if i == n - 1 else 0)
            chunk.flags |= UNORDERED if loose else 0
            chunk.tsn = tsn % 2**32
            chunk.stream_seq = 0 if loose else seq
            chunk.user_data = f"{seq}:{i};".encode()
            chunks.append(chunk)
            tsn += 1
        seq += 0 if loose else 1
    return chunks


def _deliver(stream: object, chunks: list[object]) -> list[bytes]:
    out = []
    for chunk in chunks:
        stream.add_chunk(chunk)  # type: ignore[attr-defined]
        out.extend(message for _, _, message in stream.pop_messages())  # type: ignore[attr-defined]
    return out


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=12),
    data=st.data(),
    start_tsn=st.sampled_from([0, 2**32 - 5]),  # also across the TSN wrap-around
)
def test_linear_reassembly_delivers_what_aiortc_delivers(
    sizes: list[int], data: st.DataObject, start_tsn: int
) -> None:
    unordered = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    chunks = _chunks(sizes, unordered, start_tsn)
    seed = data.draw(st.integers(0, 2**16))
    order = list(range(len(chunks)))
    # Mostly in order with a few swaps, as a network reorders; sometimes fully shuffled.
    rng = random.Random(seed)
    if seed % 4 == 0:
        rng.shuffle(order)
    else:
        for _ in range(len(order) // 4):
            i = rng.randrange(len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
    arriving = [chunks[i] for i in order]

    expected = _deliver(aiortc_sctp.InboundStream(), arriving)
    got = _deliver(sctp.LinearInboundStream(), arriving)
    assert got == expected
    assert (
        sorted(got)
        == sorted(  # everything arrived, so every message came out
            b"".join(c.user_data for c in chunks[a : a + n])  # type: ignore[attr-defined]
            for a, n in zip([sum(sizes[:k]) for k in range(len(sizes))], sizes, strict=True)
        )
    )


def test_in_order_fragments_skip_the_search() -> None:
    walks = 0
    stream = sctp.LinearInboundStream()
    original = aiortc_sctp.InboundStream.pop_messages

    def counted(self: object) -> object:
        nonlocal walks
        walks += 1
        return original(self)  # type: ignore[arg-type]

    chunks = _chunks([200, 200], [False, False], 1000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aiortc_sctp.InboundStream, "pop_messages", counted)
        messages = _deliver(stream, chunks)
    assert len(messages) == 2
    assert walks == 2  # one search per message, not one per chunk


async def _ack_rule(sack_every: int) -> tuple[list[str], bool]:
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("x")
        # aiortc's flush of the channel-open request runs (and finds no association) before
        # the test declares the association established; it would otherwise try to send.
        await asyncio.sleep(0)
        applied = sctp.tune(pc, sack_every=sack_every)
        transport = pc.sctp
        assert transport is not None
        sent: list[str] = []

        async def count(self: RTCSctpTransport) -> None:
            sent.append("sack")
            self._sack_needed = False

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RTCSctpTransport, "_send_sack", count)
            patch.setattr(sctp.TunedSctp, "_p2pfl_sack", count)
            transport._association_state = RTCSctpTransport.State.ESTABLISHED
            log: list[str] = []

            async def packet(mark: str = "") -> None:
                transport._sack_needed = True
                await transport._send_sack()
                log.append(f"{mark}{len(sent)}")

            for _ in range(sack_every):  # held back until the sack_every-th packet
                await packet()
            await packet()  # held back again ...
            await asyncio.sleep(sctp.ACK_DELAY_S * 4)
            log.append(f"timer{len(sent)}")  # ... until the delay runs out
            transport._sack_misordered.add(7)  # a gap: acknowledged at once
            await packet("gap")
            transport._sack_misordered.clear()
            transport._sack_duplicates.append(3)  # a duplicate: at once too
            await packet("dup")
            transport._sack_duplicates.clear()
            await packet()
            transport._association_state = RTCSctpTransport.State.CLOSED
            await asyncio.sleep(sctp.ACK_DELAY_S * 4)
            log.append(f"closed{len(sent)}")  # no SACK once the association is gone
        return log, applied
    finally:
        transport._association_state = RTCSctpTransport.State.CLOSED
        await pc.close()


@pytest.mark.parametrize("sack_every", [1, 2, 4])
def test_acknowledges_every_nth_packet_at_once_on_gaps_and_after_a_delay(sack_every: int) -> None:
    log, applied = asyncio.run(_ack_rule(sack_every))
    assert applied
    held = ["0"] * (sack_every - 1)
    if sack_every == 1:  # every packet at once, as aiortc does: nothing waits for the timer
        assert log == ["1", "2", "timer2", "gap3", "dup4", "5", "closed5"]
    else:
        assert log == [*held, "1", "1", "timer2", "gap3", "dup4", "4", "closed4"]


async def _recovery_rule() -> list[int]:
    """SACKs sent after each of 2 * RECOVERY_PACKETS clean packets that follow one gap."""
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("x")
        await asyncio.sleep(0)  # as in _ack_rule
        assert sctp.tune(pc, sack_every=4)
        transport = pc.sctp
        assert transport is not None
        sent = 0

        async def count(self: RTCSctpTransport) -> None:
            nonlocal sent
            sent += 1
            self._sack_needed = False

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RTCSctpTransport, "_send_sack", count)
            patch.setattr(sctp.TunedSctp, "_p2pfl_sack", count)
            transport._association_state = RTCSctpTransport.State.ESTABLISHED
            transport._sack_misordered.add(7)
            transport._sack_needed = True
            await transport._send_sack()  # the gap: at once
            transport._sack_misordered.clear()
            marks = []
            for _ in range(2 * sctp.RECOVERY_PACKETS):
                transport._sack_needed = True
                await transport._send_sack()
                marks.append(sent)
        return marks
    finally:
        transport._association_state = RTCSctpTransport.State.CLOSED
        await pc.close()


def test_after_a_loss_every_second_packet_is_acknowledged_for_a_while() -> None:
    marks = asyncio.run(_recovery_rule())
    n = sctp.RECOVERY_PACKETS
    recovering = [b - a for a, b in zip([1, *marks[: n - 1]], marks[:n], strict=True)]
    assert sum(recovering) == n // 2  # one SACK per two packets
    clean = marks[-1] - marks[n - 1]
    assert clean == n // 4  # then one per four again


async def _heard() -> tuple[float, float, float]:
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("x")
        before = sctp.last_packet_at(pc)
        assert sctp.tune(pc)
        transport = pc.sctp
        assert transport is not None
        untouched = sctp.last_packet_at(pc)
        await transport._handle_data(b"not an SCTP packet")  # dropped by aiortc, still heard
        return before, untouched, sctp.last_packet_at(pc)
    finally:
        await pc.close()


def test_every_packet_counts_as_hearing_from_the_peer() -> None:
    started = time.monotonic()
    before, untouched, heard = asyncio.run(_heard())
    assert (before, untouched) == (0.0, 0.0)
    assert started <= heard <= time.monotonic()


def test_tune_is_per_connection_and_only_on_aiortc_transports() -> None:
    async def check() -> None:
        tuned, plain = RTCPeerConnection(), RTCPeerConnection()
        try:
            assert not sctp.tune(tuned)  # no SCTP transport yet
            tuned.createDataChannel("x")
            plain.createDataChannel("x")
            assert sctp.tune(tuned)
            assert type(tuned.sctp) is sctp.TunedSctp
            assert type(plain.sctp) is RTCSctpTransport  # aiortc's class is left alone
            assert not sctp.tune(tuned)  # already applied
        finally:
            await tuned.close()
            await plain.close()

    asyncio.run(check())
    settings = LinkSettings()
    assert (settings.sack_every, settings.path_mtu) == (sctp.SACK_EVERY, 1500)


def test_chunk_size_follows_the_path_mtu_and_fits_aiortcs_reads() -> None:
    assert sctp.chunk_bytes(1500) == 1356
    assert sctp.chunk_bytes(1280) <= aiortc_sctp.USERDATA_MAX_LENGTH
    for mtu in (1280, 1400, 1500, 9000):
        size = sctp.chunk_bytes(mtu)
        assert size % 4 == 0
        packet = size + 28 + 65  # SCTP headers + the costliest DTLS record expansion
        assert packet <= min(mtu - 48, 1500)  # fits the path and aiortc's 1,500-byte reads
    with pytest.raises(ValueError, match="below IPv6's minimum"):
        sctp.chunk_bytes(1200)
    with pytest.raises(ValueError, match="sack_every"):
        sctp.tune(RTCPeerConnection(), sack_every=5)


async def _fragment(
    size: int | None, messages: list[tuple[int, bool, float | None, int | None]]
) -> tuple[list[dict[str, object]], object]:
    """Queue ``messages`` on an unconnected transport; with ``size`` None through aiortc's own
    ``_send``, else through TunedSctp's at that chunk size. Returns the chunks and the state."""
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("x")
        if size is not None:
            assert sctp.tune(pc)
        transport = pc.sctp
        assert transport is not None
        if size is not None:
            transport._p2pfl_chunk = size
        transport._local_tsn = 2**32 - 3  # across the TSN wrap-around

        async def hold(self: RTCSctpTransport) -> None:
            pass

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RTCSctpTransport, "_transmit", hold)
            patch.setattr(sctp.TunedSctp, "_transmit", hold)
            for n, (length, ordered, expiry, retransmits) in enumerate(messages):
                data = bytes([n % 256]) * length
                await transport._send(1, 53, data, expiry, retransmits, ordered)
        chunks = [dict(vars(chunk)) for chunk in transport._outbound_queue]
        return chunks, (transport._local_tsn, dict(transport._outbound_stream_seq))
    finally:
        await pc.close()


@settings(max_examples=50, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            st.integers(1, 5000),
            st.booleans(),
            st.none() | st.floats(1.0, 2.0),
            st.none() | st.integers(0, 3),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fragmentation_makes_aiortcs_chunks(
    messages: list[tuple[int, bool, float | None, int | None]],
) -> None:
    expected = asyncio.run(_fragment(None, messages))
    got = asyncio.run(_fragment(aiortc_sctp.USERDATA_MAX_LENGTH, messages))
    assert got == expected


def test_chunks_are_sized_for_the_path() -> None:
    chunks, _ = asyncio.run(_fragment(sctp.chunk_bytes(1500), [(5000, True, None, None)]))
    assert [len(c["user_data"]) for c in chunks] == [1356, 1356, 1356, 932]  # type: ignore[arg-type]
    flags = [c["flags"] for c in chunks]
    assert flags == [FIRST, 0, 0, LAST]


# --- bounded reassembly: what a peer can make the receiver hold ------------------------------

_TAG = 0x1234ABCD


def _packet(tsn: int, data: bytes, flags: int, *, stream: int = 1, seq: int = 0) -> bytes:
    """One DATA chunk in a packet of this association (verification tag ``_TAG``)."""
    chunk = aiortc_sctp.DataChunk(flags=flags)
    chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn % 2**32, stream, seq, 53
    chunk.user_data = data
    return bytes(aiortc_sctp.serialize_packet(5000, 5000, _TAG, chunk))


class _Receiver:
    """A tuned, established transport fed packets as from its peer; what it sends is parsed,
    what it refuses is recorded, what it delivers is collected."""

    def __init__(self, pc: RTCPeerConnection, first_tsn: int) -> None:
        self.pc = pc
        self.refused: list[str] = []
        self.delivered: list[bytes] = []
        self.sent: list[object] = []
        assert sctp.tune(pc, on_drop=self.refused.append)
        transport: Any = pc.sctp
        self.transport = transport
        transport._local_verification_tag = _TAG
        transport._remote_port = 5000
        transport._remote_verification_tag = 0xCAFEF00D
        transport._association_state = RTCSctpTransport.State.ESTABLISHED
        transport._last_received_tsn = (first_tsn - 1) % 2**32

        async def send(data: bytes) -> None:
            self.sent.extend(aiortc_sctp.parse_packet(data)[3])

        async def receive(stream_id: int, pp_id: int, data: bytes) -> None:
            self.delivered.append(data)

        transport.transport._send_data = send
        transport._receive = receive

    @classmethod
    async def open(cls, first_tsn: int = 2**32 - 5) -> _Receiver:
        pc = RTCPeerConnection()
        pc.createDataChannel("x")
        await asyncio.sleep(0)  # as in _ack_rule
        return cls(pc, first_tsn)

    async def feed(self, packet: bytes) -> None:
        await self.transport._handle_data(packet)
        streams = self.transport._inbound_streams.values()
        assert self.transport._p2pfl_held == sum(len(s.reassembly) for s in streams)

    @property
    def held_bytes(self) -> int:
        return int(self.transport._p2pfl_window - self.transport._advertised_rwnd)

    @property
    def aborted(self) -> bool:
        return any(isinstance(c, aiortc_sctp.AbortChunk) for c in self.sent)

    async def close(self) -> None:
        self.transport._association_state = RTCSctpTransport.State.CLOSED
        await self.pc.close()


@pytest.mark.parametrize("size", [1, 1356])
def test_a_message_that_never_ends_is_held_up_to_the_bound_then_the_association_aborts(
    size: int,
) -> None:
    """Fragments of one message, in TSN order, never the last one: aiortc alone holds them all."""

    async def check() -> tuple[int, int, list[str], bool, bool]:
        receiver = await _Receiver.open()
        tsn = 2**32 - 5  # across the TSN wrap-around
        await receiver.feed(_packet(tsn, bytes(size), FIRST))
        most_held = most_bytes = 0
        for n in range(1, 2 * sctp.HOLD_CHUNKS):
            await receiver.feed(_packet(tsn + n, bytes(size), 0))
            most_held = max(most_held, receiver.transport._p2pfl_held)
            most_bytes = max(most_bytes, receiver.held_bytes)
            if receiver.aborted:
                break
        for m in range(n + 1, n + 50):  # the peer goes on: nothing more is taken or counted
            await receiver.feed(_packet(tsn + m, bytes(size), 0))
        refused, aborted = list(receiver.refused), receiver.aborted
        state = receiver.transport._association_state
        await receiver.close()
        return most_held, most_bytes, refused, aborted, state == RTCSctpTransport.State.CLOSED

    most_held, most_bytes, refused, aborted, closed = asyncio.run(check())
    assert aborted and closed
    assert refused == ["sctp_reassembly_full"]
    assert most_held <= sctp.HOLD_CHUNKS and most_bytes <= sctp.HOLD_BYTES
    if size == 1:
        assert most_held == sctp.HOLD_CHUNKS  # tiny chunks: the count bounds them
    else:
        assert most_bytes > sctp.HOLD_BYTES - size  # full chunks: the bytes do


def test_out_of_order_chunks_past_the_window_are_dropped_and_taken_when_sent_again() -> None:
    """A loss in a flight larger than the window (aiortc's sender does not keep to it): the
    chunks past the window are dropped, not acknowledged, and taken when sent again; every
    message arrives once and in order, nothing aborts."""
    messages = [bytes([n]) * 4 * 1356 for n in range(250)]  # 1.3 MB: more than the window
    packets = []
    tsn = 2**32 - 100
    for seq, message in enumerate(messages):
        for i in range(4):
            flags = (FIRST if i == 0 else 0) | (LAST if i == 3 else 0)
            packets.append((tsn, _packet(tsn, message[i * 1356 : (i + 1) * 1356], flags, seq=seq)))
            tsn += 1

    async def check() -> tuple[list[bytes], list[str], bool, set[int]]:
        receiver = await _Receiver.open(packets[0][0])
        for _, packet in packets[1:]:  # the first is lost
            await receiver.feed(packet)
        acknowledged = set(receiver.transport._sack_misordered)
        assert receiver.held_bytes <= receiver.transport._p2pfl_window
        await receiver.feed(packets[0][1])  # resent: everything held is delivered
        for sent_tsn, packet in packets:  # then what was dropped, resent too
            if sent_tsn != packets[0][0] and sent_tsn not in acknowledged:
                await receiver.feed(packet)
        result = list(receiver.delivered), list(receiver.refused), receiver.aborted
        await receiver.close()
        return (*result, acknowledged)

    delivered, refused, aborted, acknowledged = asyncio.run(check())
    assert delivered == messages
    assert not aborted
    dropped = len(packets) - 1 - len(acknowledged)
    assert dropped > 0 and refused == ["sctp_window_full"] * dropped
    assert len(acknowledged) * 1356 <= 1024 * 1024


def test_chunks_for_too_many_streams_are_refused() -> None:
    async def check() -> tuple[list[str], bool, int]:
        receiver = await _Receiver.open()
        tsn = 2**32 - 5
        for stream in range(sctp.HOLD_STREAMS + 1):  # one complete message per stream, in order
            await receiver.feed(_packet(tsn + stream, b"x", FIRST | LAST, stream=stream))
        # Aborted: the next TSN, now on a stream it holds, is not taken either.
        await receiver.feed(_packet(tsn + sctp.HOLD_STREAMS, b"x", FIRST, stream=1))
        result = list(receiver.refused), receiver.aborted, len(receiver.delivered)
        assert receiver.transport._p2pfl_held == 0
        await receiver.close()
        return result

    refused, aborted, delivered = asyncio.run(check())
    assert (refused, aborted, delivered) == (["sctp_streams_full"], True, sctp.HOLD_STREAMS)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    unordered=st.lists(st.booleans(), min_size=12, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_the_count_of_chunks_held_follows_reordering_loss_and_delivery(
    sizes: list[int], unordered: list[bool], seed: int
) -> None:
    """Checked after every packet by _Receiver.feed, on the lean and aiortc's paths alike."""
    chunks = _chunks(sizes, unordered[: len(sizes)], 2**32 - 7)
    rng = random.Random(seed)
    order = list(chunks)
    for i in range(len(order) - 1):  # local swaps: reordering within a small window
        if rng.random() < 0.3:
            order[i], order[i + 1] = order[i + 1], order[i]
    order += [c for c in chunks if rng.random() < 0.2]  # duplicates

    async def check() -> int:
        receiver = await _Receiver.open(chunks[0].tsn)  # type: ignore[attr-defined]
        for chunk in order:
            c: Any = chunk
            await receiver.feed(_packet(c.tsn, c.user_data, c.flags, stream=1, seq=c.stream_seq))
        held = receiver.transport._p2pfl_held
        await receiver.close()
        return held

    assert asyncio.run(check()) == 0  # everything was delivered


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(2**32 - 40, 2**32 - 1) | st.integers(0, 2**32 - 1),
    order=st.lists(st.integers(0, 47), min_size=1, max_size=80),
)
def test_received_tsns_are_kept_in_serial_number_order_across_the_wrap_around(
    start: int, order: list[int]
) -> None:
    """Arrivals of TSNs ``start + k`` (any order, repeats, losses): the cumulative TSN, the
    TSNs held past it and the duplicates are those of plain integer bookkeeping, TSNs taken
    modulo 2^32. (aiortc's numeric sort stops the cumulative TSN at the wrap-around.)"""

    async def check() -> None:
        pc = RTCPeerConnection()
        pc.createDataChannel("x")
        await asyncio.sleep(0)
        assert sctp.tune(pc)
        transport: Any = pc.sctp
        transport._last_received_tsn = (start - 1) % 2**32
        cumulative, seen, duplicates = -1, set(), []
        for k in order:
            repeat = k <= cumulative or k in seen
            assert transport._mark_received((start + k) % 2**32) is repeat
            if repeat:  # reported with the next SACK
                duplicates.append(k)
            else:  # those now behind the cumulative TSN are no longer reported
                seen.add(k)
                while cumulative + 1 in seen:
                    cumulative += 1
                duplicates = [d for d in duplicates if d > cumulative]
            assert transport._last_received_tsn == (start + cumulative) % 2**32
            assert transport._sack_misordered == {
                (start + s) % 2**32 for s in seen if s > cumulative
            }
            assert transport._sack_duplicates == [(start + d) % 2**32 for d in duplicates]
        await pc.close()

    asyncio.run(check())


def test_aiortcs_bookkeeping_stops_at_the_wrap_around_and_ours_does_not() -> None:
    arrivals = [2**32 - 1, 0, 1, 2**32 - 2]  # 2^32 - 2 lost, then resent

    async def check() -> tuple[int, int]:
        receiver = await _Receiver.open(first_tsn=2**32 - 2)
        stock: Any = RTCSctpTransport.__new__(RTCSctpTransport)
        stock._last_received_tsn = 2**32 - 3
        stock._sack_misordered, stock._sack_duplicates = set(), []
        for tsn in arrivals:
            receiver.transport._mark_received(tsn)
            RTCSctpTransport._mark_received(stock, tsn)
        result = receiver.transport._last_received_tsn, stock._last_received_tsn
        await receiver.close()
        return result

    assert asyncio.run(check()) == (1, 2**32 - 3)


def test_gap_blocks_are_reported_in_serial_number_order_and_far_tsns_are_dropped() -> None:
    async def check() -> tuple[list[object], list[str]]:
        receiver = await _Receiver.open(first_tsn=2**32 - 4)
        # TSN 2^32 - 4 is lost; 2^32 - 2 .. 0 arrive, then 3, then one past what a SACK can report
        for tsn in (2**32 - 2, 2**32 - 1, 0, 3, 2**32 - 4 + sctp.HOLD_TSN_SPAN + 1):
            await receiver.feed(_packet(tsn, b"x", FIRST | LAST, seq=0))
        await receiver.feed(_packet(0, b"x", FIRST | LAST))  # a duplicate
        sacks = [c for c in receiver.sent if isinstance(c, aiortc_sctp.SackChunk)]
        refused = list(receiver.refused)
        await receiver.close()
        return sacks, refused

    sacks, refused = asyncio.run(check())
    last: Any = sacks[-1]
    assert last.cumulative_tsn == 2**32 - 5
    assert last.gaps == [(3, 5), (8, 8)]  # 2^32-2 .. 0 is one block, before 3
    assert last.duplicates == [0]
    assert refused == ["sctp_window_full"]


def test_a_forward_tsn_naming_many_streams_makes_no_more_than_the_bound() -> None:
    async def check() -> tuple[int, list[str], int]:
        receiver = await _Receiver.open(first_tsn=100)
        await receiver.feed(_packet(100, b"x", FIRST))  # a message held on stream 1
        forward = aiortc_sctp.ForwardTsnChunk()
        forward.cumulative_tsn = 101  # abandons it and the next TSN
        forward.streams = [(1, 0)] + [(sid, 0) for sid in range(2, 3000)]
        packet = aiortc_sctp.serialize_packet(5000, 5000, _TAG, forward)
        await receiver.feed(bytes(packet))
        result = len(receiver.transport._inbound_streams), list(receiver.refused)
        held = receiver.transport._p2pfl_held
        await receiver.close()
        return (*result, held)

    streams, refused, held = asyncio.run(check())
    assert streams == sctp.HOLD_STREAMS
    assert refused == ["sctp_streams_full"]
    assert held == 0  # the abandoned fragment was pruned, and counted out


# --- sending: the flight grows under delayed SACKs, within the peer's window --------------


async def _flight_under_delayed_sacks(sacks: int, rwnd: int = 1024 * 1024) -> list[int]:
    """A tuned sender with a 2 MiB message queued, its packets acknowledged as a receiver that
    SACKs every ``SACK_EVERY`` packets does (each SACK takes the oldest outstanding packets and
    advertises ``rwnd``). Returns the chunks in flight after each SACK."""
    sender = await _Receiver.open()  # established and tuned; its own DATA is parsed into .sent
    transport = sender.transport
    transport._local_tsn = 2**32 - 40  # across the TSN wrap-around
    transport._last_sacked_tsn = transport._advanced_peer_ack_tsn = 2**32 - 41  # as INIT sets
    transport._ssthresh = 1024 * 1024  # as the peer's INIT sets it (its a_rwnd)
    try:
        await transport._send(1, 53, bytes(2 * 1024 * 1024))
        flights: list[int] = []
        acked = 0
        for _ in range(sacks):
            data = [c for c in sender.sent if isinstance(c, aiortc_sctp.DataChunk)]
            acked = min(acked + sctp.SACK_EVERY, len(data))
            sack = aiortc_sctp.SackChunk()
            sack.cumulative_tsn = data[acked - 1].tsn
            sack.advertised_rwnd = rwnd
            packet = aiortc_sctp.serialize_packet(5000, 5000, _TAG, sack)
            await transport._handle_data(bytes(packet))
            flights.append(sum(1 for c in transport._sent_queue if c._in_flight))
        return flights
    finally:
        await sender.close()


def test_the_flight_grows_when_each_sack_acknowledges_several_packets() -> None:
    """aiortc's burst limit, four chunks beyond the flight after the SACK, held the flight at
    four chunks when every SACK acknowledges four packets (a fresh link sent a 16 MiB message
    at about half the rate of a 64 MiB one). The burst now counts beyond what the SACK
    acknowledged, and the congestion window bounds the flight: one chunk more per SACK."""
    flights = asyncio.run(_flight_under_delayed_sacks(120))
    assert flights[0] <= 5
    assert flights[-1] >= 100


@pytest.mark.parametrize("rwnd", [0, 1356, 32 * 1024])
def test_the_flight_stays_within_the_peers_receive_window(rwnd: int) -> None:
    """The a_rwnd of the peer's latest SACK bounds the flight (aiortc's sender ignores it); with
    a zero window one chunk still goes out, to probe it (RFC 9260 section 6.1, rule A)."""
    flights = asyncio.run(_flight_under_delayed_sacks(120, rwnd))
    most = max(1, -(-rwnd // sctp.chunk_bytes(1500)))
    assert max(flights[1:]) == most
