"""Frames of at most 256 KiB carry (transfer id, index, count, total, digest); reassembly checks
them. Pure functions: no network needed."""

from __future__ import annotations

import os

import pytest

from p2pfl.daemon.datachannel import FRAME_LIMIT, HEADER, Reassembler, split_frames


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
