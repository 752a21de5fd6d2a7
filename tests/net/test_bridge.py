"""The trio <-> asyncio bridge: results, errors, and cancellation that waits for asyncio."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable

import pytest
import trio

from p2pfl.daemon.bridge import BridgeClosed, closes_with_bridge, open_bridge
from p2pfl.daemon.datachannel import LinkSettings, RtcLink
from p2pfl.sim.netns import SharedNetwork


async def test_call_returns_the_result_computed_on_the_asyncio_thread() -> None:
    async with open_bridge() as bridge:

        async def where() -> str:
            await asyncio.sleep(0)
            return threading.current_thread().name

        assert await bridge.call(where) == "p2pfl-asyncio"


async def test_call_raises_the_asyncio_side_exception() -> None:
    async with open_bridge() as bridge:

        async def fail() -> None:
            raise KeyError("on asyncio")

        with pytest.raises(KeyError, match="on asyncio"):
            await bridge.call(fail)


async def test_trio_cancellation_cancels_and_awaits_the_asyncio_task() -> None:
    log: list[str] = []
    async with open_bridge() as bridge:

        async def slow() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                log.append("cancelled")
                await asyncio.sleep(0.2)  # cleanup that takes time
                log.append("cleaned up")
                raise

        with trio.move_on_after(0.2) as scope:
            await bridge.call(slow)
        # By the time the trio scope is left, the asyncio task has finished its cleanup.
        assert scope.cancelled_caught
        assert log == ["cancelled", "cleaned up"]


async def test_calls_after_close_raise_bridge_closed() -> None:
    async with open_bridge() as bridge:
        pass

    async def nothing() -> None:
        return None

    with pytest.raises(BridgeClosed):
        await bridge.call(nothing)


async def test_to_trio_runs_callbacks_on_the_trio_thread_in_order() -> None:
    seen: list[tuple[int, str]] = []
    done = trio.Event()
    async with open_bridge() as bridge:

        async def produce() -> None:
            for i in range(50):
                bridge.to_trio(lambda i=i: seen.append((i, threading.current_thread().name)))
            bridge.to_trio(done.set)

        await bridge.call(produce)
        with trio.fail_after(5):
            await done.wait()
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {threading.current_thread().name}


async def test_closing_the_bridge_awaits_registered_closes_before_cancelling_tasks() -> None:
    log: list[str] = []
    started: list[asyncio.Future[None]] = []
    async with open_bridge() as bridge:

        async def open_thing() -> None:
            async def close() -> None:
                await asyncio.sleep(0.05)  # still running when the bridge starts to close
                log.append("closed")

            closes_with_bridge(close)

            async def forever() -> None:
                try:
                    await asyncio.sleep(30)
                finally:
                    log.append("cancelled")

                    def late() -> None:  # cleanup that starts another task
                        log.append("late")

                    asyncio.get_running_loop().call_soon(late)
                    started.append(asyncio.ensure_future(asyncio.sleep(30)))

            bridge.submit(forever)

        await bridge.call(open_thing)
    assert log[:2] == ["closed", "cancelled"]


async def test_a_close_taken_off_is_not_awaited() -> None:
    log: list[str] = []
    async with open_bridge() as bridge:

        async def open_and_close() -> None:
            async def close() -> None:
                log.append("closed")

            unregister = closes_with_bridge(close)
            unregister()

        await bridge.call(open_and_close)
    assert log == []


@pytest.mark.netns
async def test_a_link_left_open_is_closed_with_its_sockets_before_the_loop_goes(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    """As when a dial is cancelled mid-offer: nobody closes the link, the bridge must."""
    shared_net(1)
    links: list[RtcLink] = []
    async with open_bridge() as bridge:

        async def offer() -> str:
            link = RtcLink(
                LinkSettings(), on_message=lambda _: None, on_down=lambda _: None, on_drop=print
            )
            links.append(link)
            return await link.create_offer()

        sdp = await bridge.call(offer)
        assert "candidate" in sdp  # ICE gathered: the link holds UDP sockets now
    (link,) = links
    assert link._closing is not None and link._closing.done()
    links.clear()
    del link
    gc.collect()  # an unclosed UDP transport would warn here (an error under filterwarnings)


async def test_a_submitted_task_that_fails_is_logged_not_orphaned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_bridge() as bridge:

        async def fail() -> None:
            raise KeyError("in the background")

        bridge.submit(fail)
        await bridge.call(asyncio.sleep, 0.05)  # the loop is FIFO: the task ran before this
    (record,) = [r for r in caplog.records if r.name == "p2pfl.daemon.bridge"]
    assert record.exc_info is not None and "in the background" in str(record.exc_info[1])
