"""Delayed SACKs and linear reassembly on top of aiortc's SCTP (p2pfl.daemon.sctp).

Reassembly is checked against aiortc's own InboundStream on random fragment streams, lost and
reordered chunks included; the acknowledgement rule on a real, unconnected aiortc transport whose
SACK sender is counted. The end-to-end transfers in test_transport.py and test_failures.py (loss
and delay included) run with both in place, as every link does by default.
"""

from __future__ import annotations

import asyncio
import random

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


async def _ack_rule() -> tuple[list[str], bool]:
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("x")
        applied = sctp.delay_acks(pc)
        transport = pc.sctp
        assert transport is not None
        sent: list[str] = []

        async def count(self: RTCSctpTransport) -> None:
            sent.append("sack")
            self._sack_needed = False

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RTCSctpTransport, "_send_sack", count)
            transport._association_state = RTCSctpTransport.State.ESTABLISHED
            log: list[str] = []

            async def packet(mark: str = "") -> None:
                transport._sack_needed = True
                await transport._send_sack()
                log.append(f"{mark}{len(sent)}")

            await packet()  # first packet: held back
            await packet()  # second: acknowledged with the first
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


def test_acknowledges_every_second_packet_at_once_on_gaps_and_after_a_delay() -> None:
    log, applied = asyncio.run(_ack_rule())
    assert applied
    assert log == ["0", "1", "1", "timer2", "gap3", "dup4", "4", "closed4"]


def test_delay_acks_is_per_connection_and_only_on_aiortc_transports() -> None:
    async def check() -> None:
        tuned, plain = RTCPeerConnection(), RTCPeerConnection()
        try:
            assert not sctp.delay_acks(tuned)  # no SCTP transport yet
            tuned.createDataChannel("x")
            plain.createDataChannel("x")
            assert sctp.delay_acks(tuned)
            assert type(tuned.sctp) is sctp.DelayedAckSctp
            assert type(plain.sctp) is RTCSctpTransport  # aiortc's class is left alone
            assert not sctp.delay_acks(tuned)  # already applied
        finally:
            await tuned.close()
            await plain.close()

    asyncio.run(check())
    assert LinkSettings().delayed_acks
