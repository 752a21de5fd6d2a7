"""Frames of at most 256 KiB carry (transfer id, index, count, total, CRC-32C digest); reassembly
checks them. Pure functions: no network needed."""

from __future__ import annotations

import os
import struct

import google_crc32c
import pytest

from p2pfl.daemon.datachannel import FRAME_LIMIT, HEADER, Reassembler, ice_path, split_frames


def _reassembler(drops: list[str], max_bytes: int = 10_000_000) -> Reassembler:
    return Reassembler(max_bytes, drops.append)


@pytest.mark.parametrize(
    "size", [0, 1, FRAME_LIMIT - HEADER.size, FRAME_LIMIT, 3 * FRAME_LIMIT + 7]
)
def test_frames_reassemble_to_the_original_message(size: int) -> None:
    data = os.urandom(size)
    frames = list(split_frames(data, FRAME_LIMIT, transfer_id=9))
    assert all(len(frame) <= FRAME_LIMIT for frame in frames)
    drops: list[str] = []
    reassembler = _reassembler(drops)
    results = [reassembler.feed(frame) for frame in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] == data
    assert drops == []


def test_corrupted_chunk_is_dropped_by_the_digest_check() -> None:
    frames = list(split_frames(os.urandom(100_000), 32 * 1024, transfer_id=1))
    bad = bytearray(frames[1])
    bad[-1] ^= 0x01
    frames[1] = bytes(bad)
    drops: list[str] = []
    reassembler = _reassembler(drops)
    assert [reassembler.feed(f) for f in frames] == [None] * len(frames)
    assert drops == ["digest_mismatch"]


def test_a_data_frame_is_laid_out_as_protocol_2_says() -> None:
    data = os.urandom(70_000)
    frames = list(split_frames(data, 32 * 1024, transfer_id=0x0102030405060708))
    layout = struct.Struct(">BQIIQI")  # kind, transfer id, index, count, total, CRC-32C
    assert HEADER.size == layout.size == 29
    chunk = 32 * 1024 - layout.size
    for index, frame in enumerate(frames):
        fields = layout.unpack_from(frame)
        assert fields == (4, 0x0102030405060708, index, 3, 70_000, google_crc32c.value(data))
        assert frame[layout.size :] == data[index * chunk : (index + 1) * chunk]


def test_a_protocol_1_data_frame_is_dropped_and_named() -> None:
    import asyncio

    from p2pfl.daemon.datachannel import LinkSettings, RtcLink

    drops: list[str] = []
    got: list[bytes] = []

    async def scenario() -> None:
        link = RtcLink(
            LinkSettings(), on_message=got.append, on_down=lambda _: None, on_drop=drops.append
        )
        # Protocol 1: kind 1, then the same fields and a 16-byte BLAKE2b digest.
        link._on_frame(struct.pack(">BQIIQ16s", 1, 1, 0, 1, 3, bytes(16)) + b"abc")
        link._on_frame(b"\x09rest")
        (frame,) = split_frames(b"abc", FRAME_LIMIT, transfer_id=2)
        link._on_frame(frame)
        await link.close()

    asyncio.run(scenario())
    assert drops == ["data_frame_protocol_1", "unknown_frame_kind"]
    assert got == [b"abc"]


def test_missing_frame_drops_the_transfer_and_the_next_one_still_arrives() -> None:
    first = list(split_frames(os.urandom(100_000), 32 * 1024, transfer_id=1))
    second_data = os.urandom(50_000)
    second = list(split_frames(second_data, 32 * 1024, transfer_id=2))
    drops: list[str] = []
    reassembler = _reassembler(drops)
    for frame in first[:1] + first[2:]:
        assert reassembler.feed(frame) is None
    results = [reassembler.feed(frame) for frame in second]
    assert results[-1] == second_data
    assert drops == ["out_of_sequence_frame"]


def test_oversized_message_is_refused_at_its_first_frame() -> None:
    frames = split_frames(os.urandom(300_000), 64 * 1024, transfer_id=3)
    drops: list[str] = []
    reassembler = _reassembler(drops, max_bytes=200_000)
    assert reassembler.feed(next(frames)) is None
    assert drops == ["oversized_message"]


def test_truncated_frame_is_dropped_not_raised() -> None:
    drops: list[str] = []
    assert _reassembler(drops).feed(b"\x01\x00\x00") is None
    assert drops == ["short_frame"]


def test_frame_size_above_aiortc_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="frame_bytes"):
        list(split_frames(b"x", FRAME_LIMIT + 1, transfer_id=1))


def test_stalled_transfer_is_freed_after_the_timeout_and_counted_once() -> None:
    now = [100.0]
    drops: list[str] = []
    reassembler = Reassembler(10_000_000, drops.append, timeout_s=30.0, clock=lambda: now[0])
    frames = list(split_frames(os.urandom(8 * FRAME_LIMIT), FRAME_LIMIT, transfer_id=4))
    for frame in frames[:5]:
        reassembler.feed(frame)
        now[0] += 10.0  # a slow transfer: each frame well within the timeout of the last
    assert reassembler.pending_bytes > 4 * FRAME_LIMIT
    assert not reassembler.expire() and drops == []
    now[0] += 21.0
    assert reassembler.expire()
    assert drops == ["incomplete_timeout"] and reassembler.pending_bytes == 0
    assert not reassembler.expire()
    # The rest of the stalled transfer, should it come, is skipped without a second count...
    assert [reassembler.feed(frame) for frame in frames[5:]] == [None] * (len(frames) - 5)
    assert drops == ["incomplete_timeout"]
    # ...and the next transfer arrives whole.
    data = os.urandom(3 * FRAME_LIMIT)
    assert [reassembler.feed(f) for f in split_frames(data, FRAME_LIMIT, transfer_id=5)][-1] == data


def test_expired_transfer_releases_its_memory() -> None:
    import gc
    import tracemalloc

    now = [0.0]
    drops: list[str] = []
    reassembler = Reassembler(64 << 20, drops.append, timeout_s=1.0, clock=lambda: now[0])
    tracemalloc.start()
    try:
        frames = split_frames(bytes(16 << 20), FRAME_LIMIT, transfer_id=1)
        for _ in range(60):  # about 15 MiB of the 16 held, in frames nobody else references
            reassembler.feed(next(frames))
        del frames
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        now[0] = 2.0
        assert reassembler.expire()
        gc.collect()
        freed = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert freed > 14 << 20, f"only {freed} bytes freed"


def test_a_links_watch_loop_frees_a_stalled_transfer() -> None:
    import asyncio

    from p2pfl.daemon.datachannel import LinkSettings, RtcLink

    drops: list[str] = []
    settings = LinkSettings(heartbeat_interval_s=0.02, transfer_timeout_s=0.05)

    async def scenario() -> None:
        link = RtcLink(
            settings, on_message=lambda _: None, on_down=lambda _: None, on_drop=drops.append
        )
        frames = list(split_frames(os.urandom(3 * FRAME_LIMIT), FRAME_LIMIT, transfer_id=7))
        link._on_frame(frames[0])
        watch = asyncio.ensure_future(link._watch())
        await asyncio.sleep(0.2)
        assert drops == ["incomplete_timeout"]
        link._on_frame(frames[0])  # a new transfer, held when the link closes: freed too
        await link.close()
        await watch
        assert drops == ["incomplete_timeout", "incomplete_at_close"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("local", "remote", "path"),
    [
        ("host", "host", "host"),
        ("host", "srflx", "server reflexive"),
        ("host", "prflx", "server reflexive"),
        ("relay", "host", "relayed"),
        ("host", "relay", "relayed"),
        ("relay", "srflx", "relayed"),
    ],
)
def test_ice_path_is_the_most_indirect_end_of_the_selected_pair(
    local: str, remote: str, path: str
) -> None:
    assert ice_path(local, remote) == path
