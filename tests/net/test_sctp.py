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
