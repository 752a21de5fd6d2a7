"""The trio <-> asyncio bridge: results, errors, and cancellation that waits for asyncio."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from p2pfl.daemon.bridge import BridgeClosed, open_bridge


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
