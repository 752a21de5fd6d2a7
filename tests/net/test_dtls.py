"""The lean per-datagram path (p2pfl.daemon.dtls, and sctp.py's packet fast paths) against
aiortc, aioice and pyOpenSSL as they are.

Records made by one side are read by the other, in both directions, through a real DTLS
handshake in memory; errors are pyOpenSSL's. A tuned link and a stock aiortc link exchange
messages over real ICE inside a private namespace, in both roles, also with datagrams lost in
both directions (retransmissions, fast recovery, T3). Malformed SCTP packets take aiortc's path,
which drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aioice import ice
from aiortc import RTCDtlsTransport, RTCPeerConnection, RTCSctpTransport
from aiortc import rtcsctptransport as aiortc_sctp
from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCCertificate
from OpenSSL import SSL

from p2pfl.daemon import dtls, sctp
from p2pfl.daemon.bridge import new_event_loop
from p2pfl.daemon.datachannel import LinkSettings, RtcLink
from p2pfl.sim.netns import SharedNetwork


def _connected_pair() -> tuple[SSL.Connection, SSL.Connection]:
    """A DTLS client and server connection in memory, handshake done."""
    client, server = (
        SSL.Connection(RTCCertificate.generateCertificate()._create_ssl_context(SRTP_PROFILES))
        for _ in range(2)
    )
    client.set_connect_state()
    server.set_accept_state()

    def pump(source: SSL.Connection, sink: SSL.Connection) -> None:
        while True:
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                return

    for _ in range(20):
        for end in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                end.do_handshake()
        pump(client, server)
        pump(server, client)
    return client, server


def _lean(connection: SSL.Connection) -> dtls.LeanConnection:
    connection.__class__ = dtls.LeanConnection
    lean: Any = connection
    lean.p2pfl_prepare()
    return lean  # type: ignore[no-any-return]


@pytest.mark.parametrize("lean_end", ["sender", "receiver", "both"])
def test_lean_records_are_read_by_pyopenssl_and_the_other_way_round(lean_end: str) -> None:
    sender, receiver = _connected_pair()
    if lean_end in ("sender", "both"):
        _lean(sender)
    if lean_end in ("receiver", "both"):
        _lean(receiver)
    rng = random.Random(1)
    for size in (1, 17, 1200, 1384, 4000):
        payload = rng.randbytes(size)
        assert sender.send(payload) == size
        record = sender.bio_read(65536)
        assert receiver.bio_write(record) == len(record)
        assert receiver.recv(65536 if size > 1500 else 1500) == payload
    # Nothing pending: the same errors as pyOpenSSL's, and a take that does not raise.
    with pytest.raises(SSL.WantReadError):
        receiver.recv(1500)
    with pytest.raises(SSL.WantReadError):
        receiver.bio_read(1500)
    if isinstance(receiver, dtls.LeanConnection):
        assert receiver.p2pfl_take(1500) == b""


def test_a_tampered_record_is_refused_as_pyopenssl_refuses_it() -> None:
    sender, receiver = _connected_pair()
    lean = _lean(receiver)
    sender.send(b"x" * 100)
    record = bytearray(sender.bio_read(65536))
    record[-1] ^= 1
    lean.bio_write(bytes(record))
    with pytest.raises(SSL.Error):  # DTLS discards it: nothing to read
        lean.recv(1500)
    sender.send(b"after")
    lean.bio_write(sender.bio_read(65536))
    assert lean.recv(1500) == b"after"


def test_a_closed_connection_reads_as_pyopenssl_reads_it() -> None:
    sender, receiver = _connected_pair()
    lean = _lean(receiver)
    sender.shutdown()
    lean.bio_write(sender.bio_read(65536))
    with pytest.raises(SSL.ZeroReturnError):
        lean.recv(1500)


class _Receiver:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.requests: list[object] = []

    def data_received(self, data: bytes, component: int) -> None:
        self.data.append(data)

    def request_received(self, message: object, addr: object, protocol: object) -> None:
        self.requests.append(message)


def test_dtls_datagrams_skip_the_stun_parse_and_stun_still_parses() -> None:
    receiver = _Receiver()

    async def make() -> Any:  # aioice's protocol wants a running loop
        return ice.StunProtocol(receiver)

    protocol: Any = asyncio.run(make())
    protocol.local_candidate = type("Candidate", (), {"component": 1})()
    protocol.__class__ = dtls.LeanStunProtocol
    record = bytes([23, 0xFE, 0xFD]) + os.urandom(40)  # DTLS application data
    protocol.datagram_received(record, ("10.0.0.1", 5000))
    request = ice.stun.Message(
        message_method=ice.stun.Method.BINDING, message_class=ice.stun.Class.REQUEST
    )
    protocol.datagram_received(bytes(request), ("10.0.0.1", 5000))
    protocol.datagram_received(b"\x80" + os.urandom(30), ("10.0.0.1", 5000))  # RTP: aioice's path
    assert receiver.data[0] == record
    assert len(receiver.requests) == 1
    assert len(receiver.data) == 2


def test_tune_datagrams_only_on_aiortc_transports() -> None:
    async def check() -> None:
        pc, other = RTCPeerConnection(), RTCPeerConnection()
        assert not dtls.tune_datagrams(pc)  # no SCTP transport yet
        pc.createDataChannel("x")
        other.createDataChannel("y")
        await asyncio.sleep(0)
        assert dtls.tune_datagrams(pc)
        sctp_transport: Any = pc.sctp
        assert type(sctp_transport.transport) is dtls.TunedDtls
        assert not dtls.tune_datagrams(pc)  # already tuned: left as it is
        assert type(other.sctp.transport) is RTCDtlsTransport  # type: ignore[union-attr]
        await asyncio.gather(pc.close(), other.close())

    asyncio.run(check())


# --- SCTP packets: the lone-DATA fast path and what it leaves to aiortc -----------------------


async def _tuned_transport() -> tuple[RTCPeerConnection, Any]:
    pc = RTCPeerConnection()
    pc.createDataChannel("x")
    await asyncio.sleep(0)
    assert sctp.tune(pc)
    transport: Any = pc.sctp
    transport._local_verification_tag = 0x1234ABCD
    return pc, transport


def _data_packet(tag: int, tsn: int, user_data: bytes, *, corrupt: str = "") -> bytes:
    chunk = aiortc_sctp.DataChunk(flags=aiortc_sctp.SCTP_DATA_FIRST_FRAG | 2)
    chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn, 1, 0, 53
    chunk.user_data = user_data
    packet = bytearray(aiortc_sctp.serialize_packet(5000, 5000, tag, chunk))
    if corrupt == "checksum":
        packet[-1] ^= 1
    elif corrupt == "length":
        struct.pack_into("!H", packet, 14, len(user_data) + 400)
    elif corrupt == "trailing":
        packet += b"\x00" * 8
    return bytes(packet)


def test_a_lone_data_chunk_parses_as_aiortc_parses_it() -> None:
    async def check() -> None:
        pc, transport = await _tuned_transport()
        rng = random.Random(2)
        for size in (1, 3, 4, 1356):
            packet = _data_packet(0x1234ABCD, rng.getrandbits(32), rng.randbytes(size))
            chunk = transport._p2pfl_lone_data_chunk(packet)
            _, _, _, (expected,) = aiortc_sctp.parse_packet(packet)
            assert vars(chunk) == vars(expected)
        await pc.close()

    asyncio.run(check())


@pytest.mark.parametrize("corrupt", ["checksum", "length", "trailing", "tag", "short"])
def test_a_malformed_or_foreign_packet_is_left_to_aiortc_which_drops_it(corrupt: str) -> None:
    async def check() -> list[int]:
        pc, transport = await _tuned_transport()
        tag = 0x1234ABCD if corrupt != "tag" else 0x1234ABCE
        packet = _data_packet(tag, 7, b"payload", corrupt="" if corrupt == "tag" else corrupt)
        if corrupt == "short":
            packet = packet[:20]
        assert transport._p2pfl_lone_data_chunk(packet) is None
        received: list[int] = []

        async def count(chunk: Any) -> None:
            received.append(chunk.tsn)

        transport._receive_data_chunk = count
        await transport._handle_data(packet)  # aiortc's path: no exception, nothing taken
        # The same packet, intact and ours, is taken: the count above could have seen it.
        await transport._handle_data(_data_packet(0x1234ABCD, 8, b"payload"))
        await pc.close()
        return received

    assert asyncio.run(check()) == [8]


def _sack_packet(tag: int, tsn: int, rwnd: int, gaps: int = 0, duplicates: int = 0) -> bytes:
    chunk = aiortc_sctp.SackChunk()
    chunk.cumulative_tsn, chunk.advertised_rwnd = tsn, rwnd
    chunk.gaps = [(2 + 4 * i, 3 + 4 * i) for i in range(gaps)]
    chunk.duplicates = [tsn - 1 - i for i in range(duplicates)]
    return bytes(aiortc_sctp.serialize_packet(5000, 5000, tag, chunk))


def test_a_clean_sack_parses_as_aiortc_parses_it_and_any_other_is_left_to_aiortc() -> None:
    async def check() -> None:
        pc, transport = await _tuned_transport()
        rng = random.Random(6)
        for _ in range(20):
            packet = _sack_packet(0x1234ABCD, rng.getrandbits(32), rng.getrandbits(32))
            fields = transport._p2pfl_lone_sack(packet)
            chunk = transport._p2pfl_sack_chunk(*fields)
            _, _, _, (expected,) = aiortc_sctp.parse_packet(packet)
            assert type(chunk) is aiortc_sctp.SackChunk
            assert vars(chunk) == vars(expected)
        corrupt = bytearray(_sack_packet(0x1234ABCD, 9, 4096))
        corrupt[-1] ^= 1
        for other in (
            _sack_packet(0x1234ABCD, 9, 4096, gaps=1),  # a loss: aiortc's gap handling
            _sack_packet(0x1234ABCD, 9, 4096, duplicates=1),
            _sack_packet(0x1234ABCE, 9, 4096),  # not our verification tag
            bytes(corrupt),  # bad checksum
            _sack_packet(0x1234ABCD, 9, 4096) + b"\x00" * 4,
            _data_packet(0x1234ABCD, 9, b"data"),
        ):
            assert transport._p2pfl_lone_sack(other) is None
        # Through _handle_data: a clean SACK reaches the lean handling parsed in place, and
        # aiortc's _receive_sack_chunk where the lean handling declines; one with a gap goes
        # through aiortc's parse to aiortc's handling, one with a bad tag nowhere.
        seen: list[tuple[str, int, list[tuple[int, int]]]] = []
        declined = {10}

        async def lean(cumulative_tsn: int, rwnd: int) -> bool:
            seen.append(("lean", cumulative_tsn, []))
            return cumulative_tsn not in declined

        async def record(chunk: Any) -> None:
            seen.append(("aiortc", chunk.cumulative_tsn, chunk.gaps))

        transport._p2pfl_clean_sack = lean
        transport._receive_sack_chunk = record
        await transport._handle_data(_sack_packet(0x1234ABCD, 10, 4096))
        await transport._handle_data(_sack_packet(0x1234ABCD, 11, 4096))
        await transport._handle_data(_sack_packet(0x1234ABCD, 12, 4096, gaps=1))
        await transport._handle_data(_sack_packet(0x1234ABCE, 13, 4096))
        assert seen == [
            ("lean", 10, []),
            ("aiortc", 10, []),
            ("lean", 11, []),
            ("aiortc", 12, [(2, 3)]),
        ]
        await pc.close()

    asyncio.run(check())


def test_lean_data_and_sack_packets_are_aiortcs_bytes() -> None:
    async def check() -> None:
        pc, transport = await _tuned_transport()
        transport._local_port, transport._remote_port = 5000, 5001
        transport._remote_verification_tag = 0xCAFEF00D
        sent: list[bytes] = []

        async def capture(data: bytes) -> None:
            sent.append(data)

        transport.transport._send_data = capture
        rng = random.Random(5)
        for size in (1, 2, 3, 4, 1356):
            chunk = aiortc_sctp.DataChunk(flags=rng.randrange(16))
            chunk.tsn, chunk.stream_id = rng.getrandbits(32), rng.getrandbits(16)
            chunk.stream_seq, chunk.protocol = rng.getrandbits(16), rng.getrandbits(32)
            chunk.user_data = rng.randbytes(size)
            await transport._send_chunk(chunk)
            assert sent.pop() == aiortc_sctp.serialize_packet(5000, 5001, 0xCAFEF00D, chunk)
            # Sent from the outbound queue by the lean _transmit: the same bytes.
            for name, value in vars(aiortc_sctp.DataChunk()).items():
                setattr(chunk, name, getattr(chunk, name, value))
            chunk._in_flight, chunk._sent_count, chunk._book_size = False, 0, size
            chunk._retransmit = chunk._acked = chunk._abandoned = False
            transport._flight_size, transport._cwnd = 0, 1 << 20
            transport._p2pfl_scan = False
            transport._outbound_queue.append(chunk)
            await transport._transmit()
            assert sent.pop() == aiortc_sctp.serialize_packet(5000, 5001, 0xCAFEF00D, chunk)
            assert transport._sent_queue.pop() is chunk and chunk._sent_count == 1
            transport._t3_cancel()
        transport._last_received_tsn = 2**32 - 1
        for rwnd, misordered, duplicates in [(4096, set(), []), (-5, set(), []), (9, {3}, [7])]:
            for send in (transport._p2pfl_sack, lambda: RTCSctpTransport._send_sack(transport)):
                transport._advertised_rwnd = rwnd
                transport._sack_misordered = set(misordered)
                transport._sack_duplicates = list(duplicates)
                transport._sack_needed = True
                await send()
                assert not transport._sack_needed
                assert transport._sack_duplicates == []
            assert sent.pop() == sent.pop()
        await pc.close()

    asyncio.run(check())


def test_t3_fires_at_the_last_restart_s_deadline_and_not_after_a_cancel() -> None:
    async def check() -> tuple[list[float], float, int]:
        pc, transport = await _tuned_transport()
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        first = asyncio.Event()

        def expired(self: Any) -> None:  # aiortc's, recorded instead of retransmitting
            self._t3_handle = None
            fired.append(loop.time())
            first.set()

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RTCSctpTransport, "_t3_expired", expired)
            transport._rto = 0.05
            transport._t3_start()
            await asyncio.sleep(0.03)
            transport._t3_restart()  # later: recorded, the timer re-arms when it fires
            due = loop.time() + 0.05
            assert transport._p2pfl_t3_due > 0
            async with asyncio.timeout(5):
                await first.wait()
            transport._rto = 0.04
            transport._t3_start()
            transport._t3_restart()
            transport._t3_cancel()
            await asyncio.sleep(0.1)
            count = len(fired)
        await pc.close()
        return fired, due, count

    fired, due, count = asyncio.run(check())
    assert fired[0] >= due - 0.002  # not at the first deadline (0.05 after the start)
    assert count == 1  # the cancelled one never fired


def test_the_fast_paths_are_on_for_a_checked_aiortc_only() -> None:
    assert sctp.aiortc_checked()  # the aiortc these tests run against is one of them

    async def check() -> tuple[bool, float]:
        pc = RTCPeerConnection()
        pc.createDataChannel("x")
        await asyncio.sleep(0)
        assert sctp.tune(pc, lean=False)
        transport: Any = pc.sctp
        transport._rto = 5.0
        transport._t3_start()
        transport._t3_restart()  # aiortc's: a new timer, no recorded deadline
        transport._t3_cancel()
        due = transport._p2pfl_t3_due
        await pc.close()
        return transport._p2pfl_lean, due

    assert asyncio.run(check()) == (False, 0.0)


def test_in_order_tsns_take_the_short_bookkeeping_and_gaps_aiortcs() -> None:
    """The cumulative TSN, gaps and duplicates come out as aiortc's own bookkeeping has them."""
    rng = random.Random(3)
    start = 2**32 - 20  # across the wrap-around
    arrivals = [(start + i) % 2**32 for i in range(60)]
    for _ in range(10):
        i = rng.randrange(len(arrivals) - 1)
        arrivals[i], arrivals[i + 1] = arrivals[i + 1], arrivals[i]
    arrivals[30:30] = [arrivals[5], arrivals[29]]  # duplicates
    state = ("_last_received_tsn", "_sack_misordered", "_sack_duplicates")

    async def check() -> None:
        pc, tuned = await _tuned_transport()
        stock: Any = RTCSctpTransport.__new__(RTCSctpTransport)
        for transport in (tuned, stock):
            transport._last_received_tsn = (start - 1) % 2**32
            transport._sack_misordered = set()
            transport._sack_duplicates = []
        for tsn in arrivals:
            assert tuned._mark_received(tsn) == RTCSctpTransport._mark_received(stock, tsn)
            assert [getattr(tuned, name) for name in state] == [
                getattr(stock, name) for name in state
            ]
        await pc.close()

    asyncio.run(check())


def _sender_state(transport: Any, transmits: list[str]) -> dict[str, Any]:
    """What a SACK changes on the sending side, and the calls it made."""
    forward = transport._forward_tsn_chunk
    return {
        "last_sacked": transport._last_sacked_tsn,
        "advanced": transport._advanced_peer_ack_tsn,
        "cwnd": transport._cwnd,
        "ssthresh": transport._ssthresh,
        "flight": transport._flight_size,
        "partial": transport._partial_bytes_acked,
        "rto": (transport._rto, transport._srtt, transport._rttvar),
        "recovery": transport._fast_recovery_exit,
        "sent": [(c.tsn, c._in_flight, c._acked) for c in transport._sent_queue],
        "outbound": [c.tsn for c in transport._outbound_queue],
        "t3": transport._t3_handle is None,
        "forward": None if forward is None else (forward.cumulative_tsn, forward.streams),
        "forward_streams": dict(transport._forward_tsn_streams),
        "calls": list(transmits),  # _transmit, _t3_restart, _t3_cancel in order
    }


def _logged(method: Callable[[], None], name: str, log: list[str]) -> Callable[[], None]:
    def call() -> None:
        log.append(name)
        method()

    return call


def _sender_calls(transport: Any) -> list[str]:
    """The log of ``transport``'s sender calls from now on: ``_transmit`` (recorded instead of
    sending), ``_t3_restart`` and ``_t3_cancel`` (recorded, then run), in order."""
    log: list[str] = []

    async def transmit() -> None:
        log.append("_transmit")

    transport._transmit = transmit
    for name in ("_t3_restart", "_t3_cancel"):
        setattr(transport, name, _logged(getattr(transport, name), name, log))
    return log


def test_a_clean_sack_on_the_lean_path_leaves_the_sender_as_aiortc_s_handling_does() -> None:
    """TunedSctp._p2pfl_clean_sack against aiortc's _receive_sack_chunk, from the same states:
    slow start and congestion avoidance, a full and a partly used window, chunks acked by
    earlier gap reports, resent chunks (no RTT sample), old and repeated SACKs, the TSN
    wrap-around, an abandoned chunk reaching the head (FORWARD TSN); and the states it leaves
    to aiortc (fast recovery, a FORWARD TSN under way) untouched."""
    rng = random.Random(7)

    async def check() -> tuple[int, int]:
        ends = [await _tuned_transport() for _ in range(2)]
        lean, stock = (transport for _, transport in ends)
        calls = {id(transport): _sender_calls(transport) for transport in (lean, stock)}
        taken = declined = 0
        for trial in range(60):
            start = (2**32 - 40 + rng.randrange(80)) % 2**32
            size = rng.choice([1200, 1356])
            queued = rng.randrange(0, 40)
            chunks: list[dict[str, Any]] = []
            for i in range(queued):
                acked = rng.random() < 0.1
                chunks.append(
                    {
                        "tsn": (start + i) % 2**32,
                        "_acked": acked,
                        "_in_flight": not acked and rng.random() < 0.95,
                        "_sent_count": 1 if rng.random() < 0.8 else 2,
                        "_sent_time": 1000.0 - rng.random(),
                        "_book_size": size,
                        "_abandoned": rng.random() < 0.05,
                        "flags": 0,
                        "stream_id": 1,
                        "stream_seq": i // 8,
                    }
                )
            if trial % 6 == 4 and queued > 2:  # a message abandoned (partial reliability)
                for fields in chunks[queued // 2 :]:
                    fields["_abandoned"] = True
            cwnd = rng.randrange(4, 60) * size
            state = {
                "_last_sacked_tsn": (start - 1) % 2**32,
                "_advanced_peer_ack_tsn": (start - 1) % 2**32,
                "_cwnd": cwnd,
                "_ssthresh": rng.choice([cwnd - size, cwnd, cwnd + size]),
                "_flight_size": sum(c["_book_size"] for c in chunks if c["_in_flight"]),
                "_partial_bytes_acked": rng.randrange(0, cwnd),
                "_rto": 3.0,
                "_srtt": rng.choice([None, 0.01]),
                "_rttvar": 0.005,
                "_fast_recovery_exit": None,
                "_forward_tsn_chunk": None,
                "_forward_tsn_streams": {},
            }
            if trial % 6 == 5:  # states the lean path leaves to aiortc
                name, value = rng.choice(
                    [
                        ("_fast_recovery_exit", (start + 3) % 2**32),
                        ("_forward_tsn_streams", {1: (0, start)}),
                        ("_advanced_peer_ack_tsn", (start + 2) % 2**32),  # a FORWARD TSN due
                    ]
                )
                state[name] = value
            for transport in (lean, stock):
                transport._t3_cancel()
                for name, value in state.items():
                    setattr(transport, name, value if not isinstance(value, dict) else dict(value))
                transport._sent_queue.clear()
                transport._outbound_queue.clear()
                for fields in chunks:
                    chunk = aiortc_sctp.DataChunk()
                    for name, value in fields.items():
                        setattr(chunk, name, value)
                    chunk._retransmit = False
                    chunk._misses = 0
                    chunk._expiry = None
                    chunk._max_retransmits = None
                    transport._sent_queue.append(chunk)
                if chunks:
                    transport._t3_start()
            for step in range(4):  # a few SACKs in a row, some old or repeated
                ahead = rng.randrange(-3, queued + 2)
                if trial % 6 == 4:  # up to the abandoned chunks
                    ahead = queued // 2 if step == 0 else 0
                elif trial % 12 == 3 and step == 0:  # the serial comparison's undefined case
                    ahead = 2**31
                cumulative = (lean._last_sacked_tsn + ahead) % 2**32
                before = _sender_state(lean, calls[id(lean)])
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(aiortc_sctp.time, "time", lambda: 1000.5)
                    handled = await lean._p2pfl_clean_sack(cumulative, 1024 * 1024)
                    if not handled:
                        assert _sender_state(lean, calls[id(lean)]) == before
                        declined += 1
                        break
                    taken += 1
                    sack = aiortc_sctp.SackChunk()
                    sack.cumulative_tsn = cumulative
                    await RTCSctpTransport._receive_sack_chunk(stock, sack)
                assert _sender_state(lean, calls[id(lean)]) == _sender_state(
                    stock, calls[id(stock)]
                )
        for pc, _ in ends:
            await pc.close()
        return taken, declined

    taken, declined = asyncio.run(check())
    assert taken > 150 and declined >= 10  # both kinds of state were reached


def _recorder(log: list[Any]) -> Callable[..., Any]:
    async def receive(*message: Any) -> None:
        log.append(message)

    return receive


@pytest.mark.parametrize("interleaved", [False, True], ids=["contiguous", "interleaved"])
def test_the_next_fragment_on_the_lean_path_is_received_as_aiortc_receives_it(
    interleaved: bool,
) -> None:
    """TunedSctp._p2pfl_next_fragment (or aiortc's _receive_data_chunk where it declines)
    against aiortc's _receive_data_chunk on a stock transport: messages of one to six
    fragments on two streams, across the TSN wrap-around, some arrivals swapped or repeated;
    the same cumulative TSN, gaps, duplicates, window, reassembly and delivered messages."""
    rng = random.Random(8)
    start = 2**32 - 50
    # Messages of two streams, each one's fragments on consecutive TSNs as RFC 9260 section 6.9
    # has it, or interleaved (a peer breaking that rule: aiortc then delivers none of them).
    fragments: dict[int, list[tuple[int, int, int]]] = {1: [], 3: []}  # (seq, index, count)
    for pending in fragments.values():
        for sequence in range(40):
            count = rng.randint(1, 6)
            pending.extend((sequence, index, count) for index in range(count))
    chunks: list[Any] = []
    stream_id = 1
    while fragments[1] or fragments[3]:
        if interleaved or not chunks or chunks[-1].flags & aiortc_sctp.SCTP_DATA_LAST_FRAG:
            stream_id = rng.choice([s for s in (1, 3) if fragments[s]])
        sequence, index, count = fragments[stream_id].pop(0)
        flags = (aiortc_sctp.SCTP_DATA_FIRST_FRAG if index == 0 else 0) | (
            aiortc_sctp.SCTP_DATA_LAST_FRAG if index == count - 1 else 0
        )
        chunk = aiortc_sctp.DataChunk(flags=flags)
        chunk.tsn = (start + len(chunks)) % 2**32
        chunk.stream_id, chunk.stream_seq, chunk.protocol = stream_id, sequence, 53
        chunk.user_data = rng.randbytes(rng.randint(1, 50))
        chunks.append(chunk)
    arrivals = list(chunks)
    for _ in range(12):
        i = rng.randrange(len(arrivals) - 3)
        j = i + rng.randint(1, 3)
        if i < 50 <= j:
            # Not across the wrap-around: aiortc's _mark_received consolidates a gap there in
            # numeric order (TSN 0 before 2^32 - 1) and its cumulative TSN stays behind for good.
            continue
        arrivals[i], arrivals[j] = arrivals[j], arrivals[i]
    arrivals[150:150] = [arrivals[40], arrivals[149]]  # duplicates

    def state(transport: Any, delivered: list[Any]) -> list[Any]:
        streams = {
            stream_id: ([c.tsn for c in stream.reassembly], stream.sequence_number)
            for stream_id, stream in transport._inbound_streams.items()
        }
        return [
            transport._last_received_tsn,
            sorted(transport._sack_misordered),
            transport._sack_duplicates,
            transport._advertised_rwnd,
            transport._sack_needed,
            streams,
            delivered,
        ]

    async def check() -> tuple[int, int]:
        pc, tuned = await _tuned_transport()
        other = RTCPeerConnection()
        other.createDataChannel("y")
        await asyncio.sleep(0)
        stock: Any = other.sctp
        delivered: dict[int, list[Any]] = {id(tuned): [], id(stock): []}
        for transport in (tuned, stock):
            transport._last_received_tsn = (start - 1) % 2**32
            transport._advertised_rwnd = 1 << 20
            transport._receive = _recorder(delivered[id(transport)])
        lean = fallback = 0
        for chunk in arrivals:
            tuned._sack_needed = stock._sack_needed = False
            if tuned._p2pfl_next_fragment(chunk):
                lean += 1
            else:
                fallback += 1
                await tuned._receive_data_chunk(chunk)
            await RTCSctpTransport._receive_data_chunk(stock, chunk)
            assert state(tuned, delivered[id(tuned)]) == state(stock, delivered[id(stock)])
        assert len(delivered[id(stock)]) == (0 if interleaved else 80)  # each message, once
        await asyncio.gather(pc.close(), other.close())
        return lean, fallback

    lean, fallback = asyncio.run(check())
    assert lean > (10 if interleaved else 100) and fallback > 50, (lean, fallback)  # both paths


# --- a tuned end and a stock aiortc end -------------------------------------------------------


class _StockLink(RtcLink):
    """A link on aiortc as it is: no SCTP, DTLS or ICE tuning."""

    def _tune(self) -> None:
        pass


async def _exchange(tuned_offers: bool, drop: float) -> None:
    got: dict[str, list[bytes]] = {"tuned": [], "stock": []}
    arrived = {"tuned": asyncio.Event(), "stock": asyncio.Event()}
    drops: list[str] = []

    def link(kind: str) -> RtcLink:
        cls = RtcLink if kind == "tuned" else _StockLink

        def on_message(message: bytes) -> None:
            got[kind].append(message)
            arrived[kind].set()

        return cls(
            LinkSettings(),
            on_message=on_message,
            on_down=lambda reason: None,
            on_drop=drops.append,
        )

    tuned, stock = link("tuned"), link("stock")
    offerer, answerer = (tuned, stock) if tuned_offers else (stock, tuned)
    try:
        answer = await answerer.accept_offer(await offerer.create_offer())
        await offerer.accept_answer(answer)
        async with asyncio.timeout(30):
            await asyncio.gather(tuned.wait_open(), stock.wait_open())
        tuned_pc: Any = tuned._pc
        stock_pc: Any = stock._pc
        assert type(tuned_pc.sctp) is sctp.TunedSctp
        assert type(tuned_pc.sctp.transport) is dtls.TunedDtls
        assert type(tuned_pc.sctp.transport._ssl) is dtls.LeanConnection
        assert type(stock_pc.sctp) is RTCSctpTransport
        assert type(stock_pc.sctp.transport) is RTCDtlsTransport
        assert type(stock_pc.sctp.transport._ssl) is SSL.Connection
        # A tuned end takes a DTLS datagram already queued straight from aioice's queue, not
        # through Connection.recv/recvfrom (TunedDtls._recv_next): count what still goes there.
        tuned_ice = tuned_pc.sctp.transport.transport._connection
        through_recvfrom = [0]
        recvfrom = ice.Connection.recvfrom

        async def counted(self: Any) -> tuple[bytes, int]:
            if self is tuned_ice:
                through_recvfrom[0] += 1
            return await recvfrom(self)

        ice.Connection.recvfrom = counted  # type: ignore[method-assign]
        # SACKs at the tuned end: how many the lean path handled (TunedSctp._p2pfl_clean_sack),
        # and those aiortc's _receive_sack_chunk handled, with or without gaps.
        tuned_sctp = tuned_pc.sctp
        sacks = {"lean": 0, "aiortc": 0, "aiortc with gaps": 0}
        clean_sack = sctp.TunedSctp._p2pfl_clean_sack
        receive_sack = RTCSctpTransport._receive_sack_chunk

        async def lean_counted(self: Any, cumulative_tsn: int, rwnd: int) -> bool:
            taken = await clean_sack(self, cumulative_tsn, rwnd)
            if self is tuned_sctp and taken:
                sacks["lean"] += 1
            return taken

        async def aiortc_counted(self: Any, chunk: Any) -> None:
            if self is tuned_sctp:
                sacks["aiortc with gaps" if chunk.gaps else "aiortc"] += 1
            await receive_sack(self, chunk)

        sctp.TunedSctp._p2pfl_clean_sack = lean_counted  # type: ignore[method-assign]
        # DATA chunks at the tuned end: how many took the lean path (_p2pfl_next_fragment).
        fragments = {"lean": 0, "aiortc": 0}
        next_fragment = sctp.TunedSctp._p2pfl_next_fragment

        def fragment_counted(self: Any, chunk: Any) -> bool:
            taken = next_fragment(self, chunk)
            if self is tuned_sctp:
                fragments["lean" if taken else "aiortc"] += 1
            return taken

        sctp.TunedSctp._p2pfl_next_fragment = fragment_counted  # type: ignore[method-assign]
        RTCSctpTransport._receive_sack_chunk = aiortc_counted  # type: ignore[method-assign]
        # Records that do not decrypt (a DTLS first byte, random bytes) are dropped as aiortc
        # drops them, on either path; the transfer goes on.
        for _ in range(3):
            tuned_ice.data_received(bytes([23, 0xFE, 0xFD]) + os.urandom(60), 1)
        size = 600_000 if drop else 3_000_000
        messages = {"tuned": os.urandom(size), "stock": os.urandom(size // 3)}
        try:
            with _lossy_datagrams(drop, seed=4):
                async with asyncio.timeout(120):
                    await asyncio.gather(
                        tuned.send_message(messages["tuned"]),
                        stock.send_message(messages["stock"]),
                    )
                    await arrived["stock"].wait()
                    await arrived["tuned"].wait()
        finally:
            ice.Connection.recvfrom = recvfrom  # type: ignore[method-assign]
            sctp.TunedSctp._p2pfl_clean_sack = clean_sack  # type: ignore[method-assign]
            sctp.TunedSctp._p2pfl_next_fragment = next_fragment  # type: ignore[method-assign]
            RTCSctpTransport._receive_sack_chunk = receive_sack  # type: ignore[method-assign]
        assert got["stock"] == [messages["tuned"]]
        assert got["tuned"] == [messages["stock"]]
        assert drops == []
        # The tuned end reads its sockets through UDP GRO (dtls.GroTransport), the stock end
        # through the event loop's transport; the stock end's datagrams (no GSO) arrive one
        # per read. ICE consent checks (STUN requests and responses) pass both ways.
        stock_ice = stock_pc.sctp.transport.transport._connection
        assert all(type(p.transport) is dtls.GroTransport for p in tuned_ice._protocols)
        assert not any(type(p.transport) is dtls.GroTransport for p in stock_ice._protocols)
        assert _coalesced(tuned_ice) == 0
        await _consent(tuned_ice)
        await _consent(stock_ice)
        received = tuned_pc.sctp.transport._get_stats()
        packets = next(s.packetsReceived for s in received.values() if s.type == "transport")
        if not drop:  # a clean transfer queues datagrams faster than one wake-up each
            assert through_recvfrom[0] < packets / 2, (through_recvfrom[0], packets)
        # The tuned end's bursts of DATA leave through UDP GSO (TunedDtls._p2pfl_send_packets),
        # a batch per system call, and the stock end reads them as one datagram each: most of
        # the tuned end's datagrams (the rest: SACKs, and bursts of one).
        sent = next(s.packetsSent for s in received.values() if s.type == "transport")
        segmented = tuned_pc.sctp.transport.p2pfl_segmented
        print("datagrams sent by the tuned end:", sent, "of them through GSO:", segmented)
        assert segmented > sent / 2, (segmented, sent)
        # The stock end SACKs every packet of the tuned end's message (about 2,200). Those
        # reporting gaps take aiortc's handling (losses: here also datagrams the stock end's
        # smaller socket buffer drops), as do clean ones during fast recovery; the clean ones
        # outside it, most of them, take the lean path.
        print("SACKs at the tuned end:", sacks)
        assert sacks["lean"] > sum(sacks.values()) / 4, sacks
        assert sacks["aiortc"] < sacks["lean"] / 2, sacks
        if drop:
            assert sacks["aiortc with gaps"] > 0, sacks
        # The stock end's message arrives in about 860 packets (aiortc's 1,160-byte chunks);
        # the lean path takes the in-order fragments but the last, aiortc's the rest (after
        # a loss, until the gap is filled).
        print("DATA chunks at the tuned end:", fragments)
        assert fragments["lean"] > (0.9 if not drop else 0.3) * sum(fragments.values()), fragments
    finally:
        await asyncio.gather(tuned.close(), stock.close())


@contextlib.contextmanager
def _lossy_datagrams(drop: float, *, seed: int) -> Iterator[None]:
    """Within the block, every datagram either send path hands the kernel (aioice's
    ``send_data``; the records of a GSO batch, ``dtls.send_segments``) is lost with probability
    ``drop``; nothing changes where ``drop`` is 0."""
    if not drop:
        yield
        return
    rng = random.Random(seed)
    send_data = ice.StunProtocol.send_data
    send_segments = dtls.send_segments

    async def lossy(self: Any, data: bytes, addr: tuple[str, int]) -> None:
        if rng.random() >= drop:
            await send_data(self, data, addr)

    def lossy_segments(sock: Any, records: list[Any], address: Any) -> None:
        kept = [record for record in records if rng.random() >= drop]
        if kept:  # still a batch GSO takes: equal sizes, then perhaps one shorter
            send_segments(sock, kept, address)

    ice.StunProtocol.send_data = lossy  # type: ignore[method-assign]
    dtls.send_segments = lossy_segments  # type: ignore[assignment]
    try:
        yield
    finally:
        ice.StunProtocol.send_data = send_data  # type: ignore[method-assign]
        dtls.send_segments = send_segments  # type: ignore[assignment]


def _coalesced(connection: Any) -> int:
    """Datagrams a link's sockets read in batches of two or more (UDP GRO)."""
    return sum(getattr(p.transport, "p2pfl_coalesced", 0) for p in connection._protocols)


async def _consent(connection: Any) -> None:
    """An ICE consent check (RFC 7675) on the nominated pair, as aioice's ``query_consent``
    sends it: a STUN request answered by the peer (raises ``TransactionError`` otherwise)."""
    pair = connection._nominated[1]
    request = connection.build_request(pair, nominate=False)
    key = connection.remote_password.encode("utf8")
    async with asyncio.timeout(10):
        await pair.protocol.request(request, pair.remote_addr, integrity_key=key)


@pytest.mark.netns
@pytest.mark.parametrize("tuned_offers", [True, False], ids=["tuned-offers", "stock-offers"])
@pytest.mark.parametrize("drop", [0.0, 0.03], ids=["clean", "lossy"])
def test_a_tuned_end_and_a_stock_aiortc_end_exchange_messages(
    shared_net: Callable[[int], SharedNetwork], tuned_offers: bool, drop: float
) -> None:
    shared_net(2)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_exchange(tuned_offers, drop))


def test_gap_blocks_are_cut_to_the_outstanding_tsns_before_aiortc_walks_them() -> None:
    """Honest gap reports reach aiortc as sent; a peer's blocks of 0..65535 (aiortc walked each
    offset: seconds of the event loop per packet) are cut to the 30 TSNs outstanding, merged,
    and reported; the sender ends as aiortc's handling of the cut report leaves it."""
    rng = random.Random(11)
    start = 2**32 - 10  # across the wrap-around

    def load(transport: Any) -> None:
        transport._t3_cancel()
        transport._sent_queue.clear()
        for i in range(30):
            chunk = aiortc_sctp.DataChunk()
            chunk.tsn, chunk.flags, chunk.stream_id, chunk.stream_seq = (start + i) % 2**32, 0, 1, 0
            chunk._acked, chunk._in_flight, chunk._sent_count = False, True, 1
            chunk._sent_time, chunk._book_size, chunk._abandoned = 999.9, 1356, False
            chunk._retransmit, chunk._misses, chunk._expiry = False, 0, None
            chunk._max_retransmits = None
            transport._sent_queue.append(chunk)
        transport._last_sacked_tsn = transport._advanced_peer_ack_tsn = (start - 1) % 2**32
        transport._flight_size, transport._cwnd, transport._ssthresh = 30 * 1356, 40 * 1356, 10**6
        transport._fast_recovery_exit = None
        transport._t3_start()

    def sack(gaps: list[tuple[int, int]]) -> Any:
        chunk = aiortc_sctp.SackChunk()
        chunk.cumulative_tsn = (start + 2) % 2**32
        chunk.gaps = list(gaps)
        return chunk

    async def check() -> list[str]:
        ends = [await _tuned_transport() for _ in range(2)]
        lean, stock = (transport for _, transport in ends)
        refused: list[str] = []
        lean._p2pfl_on_drop = refused.append
        calls = {id(transport): _sender_calls(transport) for transport in (lean, stock)}
        for trial in range(20):
            edges = sorted(rng.sample(range(1, 27), 4))  # 27 outstanding past the cumulative
            honest = [(edges[0], edges[1]), (edges[2] + 1, edges[3] + 1)]
            hostile = [(0, 65535)] * 300 + [(9, 4)] if trial % 2 else []
            load(lean)
            load(stock)
            report = sack(hostile or honest)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(aiortc_sctp.time, "time", lambda: 1000.0)
                await lean._receive_sack_chunk(report)
                await RTCSctpTransport._receive_sack_chunk(stock, sack(report.gaps))
            assert report.gaps == ([(1, 27)] if hostile else honest)
            assert _sender_state(lean, calls[id(lean)]) == _sender_state(stock, calls[id(stock)])
        for pc, _ in ends:
            await pc.close()
        return refused

    assert asyncio.run(check()) == ["sctp_sack_out_of_range"] * 10


# --- UDP GSO: a burst of records in one system call -------------------------------------------


def test_gso_batches_hold_equal_records_then_at_most_one_shorter() -> None:
    def sizes(lengths: list[int]) -> list[list[int]]:
        return [[len(r) for r in group] for group in dtls.gso_groups([bytes(n) for n in lengths])]

    assert sizes([]) == []
    assert sizes([9]) == [[9]]
    assert sizes([9, 9, 9, 4]) == [[9, 9, 9, 4]]
    assert sizes([9, 9, 4, 9, 9]) == [[9, 9, 4], [9, 9]]
    assert sizes([4, 9, 9]) == [[4], [9, 9]]  # a longer record cannot follow a segment
    assert sizes([9, 4, 4]) == [[9, 4], [4]]  # only the last segment may be shorter
    many = sizes([1400] * 70)
    assert [len(group) for group in many] == [32, 32, 6]  # GSO_MAX_SEGMENTS each
    assert sizes([20_000] * 4) == [[20_000] * 3, [20_000]]  # within one UDP payload


@pytest.mark.netns
def test_a_gso_batch_arrives_as_one_datagram_per_record(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    import socket

    shared_net(1)
    rng = random.Random(7)
    records = [rng.randbytes(n) for n in (1200, 1200, 1200, 300, 1200, 900, 900, 900, 5)]
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
    ):
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        groups = list(dtls.gso_groups(records))
        assert len(groups) == 3
        for group in groups:
            dtls.send_segments(sender, group, receiver.getsockname())
        assert [receiver.recv(2048) for _ in records] == records
        # A socket whose datagrams go without a UDP checksum cannot use GSO: the kernel
        # refuses the batch, and sends none of it.
        sender.setsockopt(socket.SOL_SOCKET, _SO_NO_CHECK, 1)
        with pytest.raises(OSError):
            dtls.send_segments(sender, groups[0], receiver.getsockname())
        dtls.send_segments(sender, records[-1:], receiver.getsockname())  # one: plain sendto
        assert receiver.recv(2048) == records[-1]


_SO_NO_CHECK = 11  # Linux: send UDP datagrams without a checksum (GSO then refuses)


async def _transfer_refused_gso() -> tuple[bool, int, int]:
    import socket

    arrived = asyncio.Event()
    got: list[bytes] = []

    def on_message(message: bytes) -> None:
        got.append(message)
        arrived.set()

    def link(on_message: Callable[[bytes], None]) -> RtcLink:
        return RtcLink(
            LinkSettings(), on_message=on_message, on_down=lambda r: None, on_drop=lambda r: None
        )

    sender, receiver = link(lambda message: None), link(on_message)
    try:
        await sender.accept_answer(await receiver.accept_offer(await sender.create_offer()))
        async with asyncio.timeout(30):
            await asyncio.gather(sender.wait_open(), receiver.wait_open())
        pc: Any = sender._pc
        before = pc.sctp.transport.p2pfl_segmented  # the channel's opening, perhaps
        connection = pc.sctp.transport.transport._connection
        for protocol in connection._protocols:
            raw = protocol.transport.get_extra_info("socket")
            raw.setsockopt(socket.SOL_SOCKET, _SO_NO_CHECK, 1)
        message = os.urandom(1_000_000)
        await sender.send_message(message)
        async with asyncio.timeout(60):
            await arrived.wait()
        assert got == [message]
        stats = pc.sctp.transport._get_stats()
        sent = next(s.packetsSent for s in stats.values() if s.type == "transport")
        return pc.sctp.transport._p2pfl_gso, pc.sctp.transport.p2pfl_segmented - before, sent
    finally:
        await asyncio.gather(sender.close(), receiver.close())


@pytest.mark.netns
def test_a_kernel_that_refuses_gso_gets_one_datagram_per_call(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    shared_net(2)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        gso, segmented, sent = runner.run(_transfer_refused_gso())
    # The first batch was refused (and sent one by one), GSO is off for the link, and the
    # message still arrived whole through aioice's send path.
    assert not gso
    assert segmented == 0
    assert sent > 700  # 1 MB in 1,356-byte chunks


# --- UDP GRO: a peer's GSO batch read in one system call --------------------------------------


def test_gro_reads_are_cut_into_the_datagrams_sent_or_dropped_whole_with_a_reason() -> None:
    import socket

    gro = (dtls._SOL_UDP, dtls.UDP_GRO)
    data = bytes(range(256)) * 15  # 3,840 bytes

    def size(n: int) -> list[tuple[int, int, bytes]]:
        return [(*gro, struct.pack("=i", n))]

    assert dtls.gro_segments(data, [], 0) == [data]  # no segment size: one datagram
    assert dtls.gro_segments(data, size(1200), 0) == [
        data[:1200],
        data[1200:2400],
        data[2400:3600],
        data[3600:],  # the last may be shorter
    ]
    assert dtls.gro_segments(data, size(1280), 0) == [data[:1280], data[1280:2560], data[2560:]]
    assert dtls.gro_segments(data, size(3840), 0) == [data]
    assert dtls.gro_segments(data, size(9000), 0) == [data]
    assert dtls.gro_segments(b"", [], 0) == [b""]  # an empty datagram, as asyncio reads it
    other = [(socket.SOL_SOCKET, 99, b"\x01\x02")]  # not the segment size: ignored
    assert dtls.gro_segments(data, other + size(1920), 0) == [data[:1920], data[1920:]]
    assert dtls.gro_segments(data, size(1200), socket.MSG_TRUNC) == "udp_read_truncated"
    assert dtls.gro_segments(data, [], socket.MSG_CTRUNC) == "udp_control_truncated"
    assert dtls.gro_segments(data, size(0), 0) == "udp_bad_segment_size"
    assert dtls.gro_segments(data, size(-1200), 0) == "udp_bad_segment_size"
    assert dtls.gro_segments(data, [(*gro, b"\x04\x00")], 0) == "udp_bad_segment_size"


def test_only_the_event_loop_s_own_udp_transports_are_replaced() -> None:
    """A relayed candidate's protocol is aioice's StunProtocol over a TURN allocation's
    transport: its datagrams are not the socket's to read, so it stays as it is."""
    from aioice.turn import TurnTransport

    class Relayed:
        transport = TurnTransport(inner_protocol=None)  # type: ignore[arg-type]

    relayed = Relayed()
    assert not dtls.read_coalesced(relayed)
    assert type(relayed.transport) is TurnTransport


class _Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.datagrams: list[bytes] = []
        self.lost = 0
        self.arrived = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost += 1

    async def wait_for(self, count: int) -> list[bytes]:
        async with asyncio.timeout(10):
            while len(self.datagrams) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.datagrams


async def _gro_reads() -> None:
    import socket

    from aioice import stun

    loop = asyncio.get_running_loop()
    rng = random.Random(5)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # The event loop's transport replaced over the same socket (same address), detached
        # from the protocol: only the replacement's close reaches connection_lost.
        endpoint, protocol = await loop.create_datagram_endpoint(
            _Recorder, local_addr=("127.0.0.1", 0)
        )
        address = endpoint.get_extra_info("sockname")
        assert dtls.read_coalesced(protocol)
        transport = protocol.transport
        assert type(transport) is dtls.GroTransport and endpoint.is_closing()
        assert transport.get_extra_info("sockname") == address
        assert not dtls.read_coalesced(protocol)  # once
        # Four GSO batches, a STUN request and a datagram sent alone, in this order: each
        # arrives as sent, in order; the batches' records in one read each (more than one
        # wake-up hands over: dtls._DATAGRAMS_PER_WAKEUP).
        records = [rng.randbytes(n) for n in ((1300,) * 20 + (700,) + (1100,) * 5) * 2]
        assert len(records) > dtls._DATAGRAMS_PER_WAKEUP
        stun_request = bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
        alone = rng.randbytes(900)
        for group in dtls.gso_groups(records):
            dtls.send_segments(sender, group, address)
        sender.sendto(stun_request, address)
        sender.sendto(alone, address)
        expected = [*records, stun_request, alone]
        assert await protocol.wait_for(len(expected)) == expected
        assert transport.p2pfl_coalesced == len(records)
        # Sends go from the same socket.
        transport.sendto(b"back", sender.getsockname())
        sender.settimeout(5)
        assert sender.recvfrom(100) == (b"back", address)
        await asyncio.sleep(0)
        assert protocol.lost == 0
        transport.close()
        await asyncio.sleep(0)
        assert protocol.lost == 1 and transport.is_closing()

        # A read larger than the read buffer is truncated: dropped whole and counted, and the
        # reader goes on.
        small = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        small.bind(("127.0.0.1", 0))
        small.setblocking(False)
        small.setsockopt(dtls._SOL_UDP, dtls.UDP_GRO, 1)
        drops: list[str] = []
        recorder = _Recorder()
        reader = dtls.GroTransport(loop, small, recorder, drops.append, read_bytes=2048)
        dtls.send_segments(sender, [bytes([23]) * 1200] * 3, small.getsockname())
        sender.sendto(alone, small.getsockname())
        assert await recorder.wait_for(1) == [alone]
        assert drops == ["udp_read_truncated"]
        reader.close()
    finally:
        sender.close()


@pytest.mark.netns
@pytest.mark.parametrize("loop", ["bridge", "asyncio"])
def test_a_gso_batch_is_read_through_gro_as_the_datagrams_it_was_sent_as(
    shared_net: Callable[[int], SharedNetwork], loop: str
) -> None:
    """On the bridge's loop (uvloop's) and on asyncio's own, whose UDP transport it replaces."""
    shared_net(1)
    factory = new_event_loop if loop == "bridge" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_gro_reads())


async def _tuned_pair_exchange(drop: float) -> tuple[list[int], list[int]]:
    got: dict[int, list[bytes]] = {0: [], 1: []}
    arrived = {0: asyncio.Event(), 1: asyncio.Event()}
    drops: list[str] = []

    def link(index: int) -> RtcLink:
        def on_message(message: bytes) -> None:
            got[index].append(message)
            arrived[index].set()

        return RtcLink(
            LinkSettings(), on_message=on_message, on_down=lambda r: None, on_drop=drops.append
        )

    ends = [link(0), link(1)]
    try:
        await ends[0].accept_answer(await ends[1].accept_offer(await ends[0].create_offer()))
        async with asyncio.timeout(30):
            await asyncio.gather(*(end.wait_open() for end in ends))
        connections = [end._pc.sctp.transport.transport._connection for end in ends]  # type: ignore[attr-defined]
        for connection in connections:
            assert all(type(p.transport) is dtls.GroTransport for p in connection._protocols)
        size = 600_000 if drop else 3_000_000
        messages = [os.urandom(size), os.urandom(size // 2)]
        with _lossy_datagrams(drop, seed=9):
            async with asyncio.timeout(120):
                await asyncio.gather(
                    *(end.send_message(m) for end, m in zip(ends, messages, strict=True))
                )
                await asyncio.gather(arrived[0].wait(), arrived[1].wait())
            assert got[1] == [messages[0]]
            assert got[0] == [messages[1]]
            assert drops == []
            for connection in connections:
                await _consent(connection)  # STUN still reaches aioice, both ways
        received = []
        for end in ends:
            stats = end._pc.sctp.transport._get_stats()  # type: ignore[attr-defined]
            received.append(
                next(s.packetsReceived for s in stats.values() if s.type == "transport")
            )
        return [_coalesced(c) for c in connections], received
    finally:
        await asyncio.gather(*(end.close() for end in ends))


@pytest.mark.netns
@pytest.mark.parametrize("drop", [0.0, 0.03], ids=["clean", "lossy"])
def test_two_tuned_ends_read_each_other_s_gso_batches_through_gro(
    shared_net: Callable[[int], SharedNetwork], drop: float
) -> None:
    shared_net(2)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        coalesced, received = runner.run(_tuned_pair_exchange(drop))
    # Both ends send through GSO and read through GRO: most datagrams (DATA one way, SACKs
    # the other) arrive in reads of two or more, and every message arrived whole.
    print("datagrams received:", received, "of them in batches:", coalesced)
    for batched, total in zip(coalesced, received, strict=True):
        assert batched > (0.5 if not drop else 0.2) * total, (coalesced, received)
