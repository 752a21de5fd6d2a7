"""DropLog counts each drop once by stage/reason/peer; contained() keeps errors in their scope."""

from __future__ import annotations

import logging

import pytest
import trio

from p2pfl.daemon.drops import DropLog, contained


def test_count_adds_to_totals_peer_totals_and_hooks() -> None:
    drops = DropLog()
    seen: list[tuple[str, str, int]] = []
    drops.add_hook(lambda stage, reason, n: seen.append((stage, reason, n)))
    drops.count("signaling", "bad_signature", "peer-a")
    drops.count("signaling", "bad_signature", "peer-a")
    drops.count("envelope", "replayed", "peer-b", n=3)
    assert drops.get("signaling", "bad_signature") == 2
    assert drops.stage_totals() == {"signaling": 2, "envelope": 3}
    assert drops.peer_totals("peer-a") == {"signaling": 2}
    assert drops.snapshot() == {"envelope/replayed": 3, "signaling/bad_signature": 2}
    assert seen[-1] == ("envelope", "replayed", 3)


def test_unknown_stage_is_our_own_bug_and_raises() -> None:
    with pytest.raises(ValueError, match="unknown drop stage"):
        DropLog().count("somewhere", "x")


def test_per_peer_memory_is_bounded_oldest_first() -> None:
    drops = DropLog(max_peers=2)
    for peer in ("a", "b", "a", "c"):
        drops.count("link", "bad_frame", peer)
    assert drops.peer_totals("b") == {}
    assert drops.peer_totals("a") == {"link": 2}
    assert drops.peer_totals("c") == {"link": 1}


async def test_contained_counts_an_error_and_lets_the_caller_go_on() -> None:
    drops = DropLog()

    async def explode() -> None:
        raise trio.BrokenResourceError("reset by peer")

    await contained(drops, "signaling", "peer-a", explode)
    assert drops.get("signaling", "error_BrokenResourceError") == 1
    assert drops.peer_totals("peer-a") == {"signaling": 1}


async def test_contained_lets_cancellation_through() -> None:
    drops = DropLog()
    with trio.move_on_after(0.01) as scope:
        await contained(drops, "link", None, trio.sleep_forever)
    assert scope.cancelled_caught
    assert drops.totals == {}


async def test_contained_names_what_ended_a_nursery_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    drops = DropLog()

    async def nursery_fails() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise trio.BrokenResourceError("reset by peer")

    with caplog.at_level(logging.WARNING, logger="p2pfl.daemon.drops"):
        await contained(drops, "signaling", "peer-a", nursery_fails)
    assert drops.get("signaling", "error_ExceptionGroup") == 1
    assert caplog.records[-1].error == "BrokenResourceError: reset by peer"
