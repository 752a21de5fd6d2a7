"""The one boundary between trio and asyncio: an asyncio loop in a dedicated thread.

aiortc and AsyncZeroconf are asyncio libraries; the daemon is trio. Rather than trio-asyncio
(measured 30-40% slower here, and it lost Ctrl-C under load), each node runs one plain asyncio
loop in its own thread and talks to it only through this module:

* ``await bridge.call(fn, *args)`` (trio side) runs the coroutine ``fn(*args)`` as a task on the
  asyncio loop and returns its result or raises its exception. If the trio caller is cancelled,
  the asyncio task is cancelled and *awaited* (shielded) before the cancellation propagates, so
  no asyncio work outlives the trio scope that asked for it.
* ``bridge.to_trio(fn, *args)`` (asyncio side) schedules a synchronous ``fn(*args)`` on the trio
  loop without blocking the asyncio thread; calls keep their order. Used to hand events to trio
  memory channels. Dropped silently once the trio run has finished.
* ``open_bridge()`` is the trio async context manager that starts the thread and, on exit,
  first awaits every close registered with ``closes_with_bridge`` (peer links: their sockets
  must be closed while the loop still runs), then cancels every remaining asyncio task (again,
  for tasks that cancellation itself started), waits for them, closes the loop and joins the
  thread.

The loop is uvloop's where uvloop is installed (it is a dependency on every platform it
supports), asyncio's own elsewhere. aiortc does its per-packet work in Python, one event-loop
turn per UDP datagram; with libuv's loop in C under it, a data channel moves the same bytes with
about half the CPU (64 MiB between two node processes: 1.3-1.6 CPU-seconds per end instead of
2.1-2.2, 40-47 MB/s instead of 29; benchmarks/bench_transport.py).

Threads started by the bridge inherit the network namespace of the thread that opens it (see
``p2pfl.sim.netns``), which is what lets in-process tests run nodes inside a private namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import trio

T = TypeVar("T")
_log = logging.getLogger(__name__)

__all__ = [
    "AsyncioBridge",
    "BridgeClosed",
    "closes_with_bridge",
    "new_event_loop",
    "open_bridge",
    "owning_datagram_endpoints",
    "sweeps_with_bridge",
]

_CLOSE_TIMEOUT_S = 10.0
_DRAIN_ROUNDS = 5
_this_thread = threading.local()  # .bridge: the AsyncioBridge whose loop runs in this thread


_ENDPOINTS: contextvars.ContextVar[set[asyncio.BaseTransport] | None] = contextvars.ContextVar(
    "p2pfl_datagram_endpoints", default=None
)


@contextlib.contextmanager
def owning_datagram_endpoints(owner: set[asyncio.BaseTransport]) -> Iterator[None]:
    """On a bridge's loop: every UDP endpoint opened in this context (and in the tasks it
    starts, which copy the context) is added to ``owner`` as soon as it exists.

    aioice gathers a link's host candidates one address at a time and hands the sockets to its
    connection only when the last one is open; a gathering cancelled in between (a dial timing
    out) drops the ones already open, and nothing would close them. The link closes what it
    owns instead (``RtcLink.close``).
    """
    token = _ENDPOINTS.set(owner)
    try:
        yield
    finally:
        _ENDPOINTS.reset(token)


class _OwnedEndpoints:
    """Mixin for an event loop class: datagram endpoints are recorded with their owner, from the
    moment the socket is connected (a cancelled ``create_datagram_endpoint`` may still have
    opened it, and the loop does not close it then)."""

    async def create_datagram_endpoint(
        self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any
    ) -> Any:
        owner = _ENDPOINTS.get()
        if owner is not None:
            protocol_factory = functools.partial(_owned_protocol, protocol_factory, owner)
        return await super().create_datagram_endpoint(  # type: ignore[misc]
            protocol_factory, *args, **kwargs
        )


def _owned_protocol(factory: Callable[[], Any], owner: set[asyncio.BaseTransport]) -> Any:
    protocol = factory()
    connection_made = protocol.connection_made

    def made(transport: asyncio.BaseTransport) -> None:
        owner.add(transport)
        connection_made(transport)

    protocol.connection_made = made
    return protocol


class _AsyncioLoop(_OwnedEndpoints, asyncio.SelectorEventLoop):
    pass


@functools.cache
def _loop_class() -> type[asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return _AsyncioLoop

    class _Uvloop(_OwnedEndpoints, uvloop.Loop):  # type: ignore[misc]
        pass

    return _Uvloop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed, else asyncio's; either records the UDP
    endpoints it opens with their owner (``owning_datagram_endpoints``)."""
    return _loop_class()()


class BridgeClosed(RuntimeError):
    """The asyncio loop is gone (the node is shutting down) or cancelled the task itself."""


class AsyncioBridge:
    """An asyncio event loop running in a dedicated daemon thread, called from trio."""

    def __init__(self, name: str = "p2pfl-asyncio") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._closing = False
        self._background: set[asyncio.Future[Any]] = set()
        self._closers: set[Callable[[], Awaitable[object]]] = set()
        self._sweeps: list[weakref.WeakMethod[Callable[[], object]]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise BridgeClosed("the asyncio bridge is not running")
        return self._loop

    def start(self, trio_token: trio.lowlevel.TrioToken) -> None:
        """Start the loop thread and wait until the loop runs (blocking, a few ms)."""
        self._trio_token = trio_token
        ready: Future[asyncio.AbstractEventLoop] = Future()

        def run() -> None:
            loop = new_event_loop()
            asyncio.set_event_loop(loop)
            _this_thread.bridge = self
            loop.call_soon(ready.set_result, loop)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        self._loop = ready.result(timeout=10)

    def close(self) -> None:
        """Cancel all asyncio tasks, let them finish, stop the loop, join the thread (blocking)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or self._closing:
            return
        self._closing = True

        async def drain() -> None:
            # Registered closes first (and those already under way, which they join): a link's
            # UDP sockets must be closed on the running loop, not abandoned with it.
            closers, self._closers = list(self._closers), set()
            if closers:
                closing = [asyncio.ensure_future(close()) for close in closers]
                _, late = await asyncio.wait(closing, timeout=_CLOSE_TIMEOUT_S)
                for task in closing:
                    task.add_done_callback(_retrieve)
                for task in late:
                    task.cancel()
            current = asyncio.current_task()
            # Cancelling a task can start others (cleanup work): drain until none is left.
            for _ in range(_DRAIN_ROUNDS):
                tasks = [t for t in asyncio.all_tasks() if t is not current]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            # Last resort, after every task is done: sockets a close raced with (created by a
            # task that finished after the close ran) are closed here, not left to the loop.
            for sweep in self._sweeps:
                method = sweep()
                if method is not None:
                    with contextlib.suppress(Exception):
                        method()
            await loop.shutdown_asyncgens()

        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=2 * _CLOSE_TIMEOUT_S)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = None

    def closes_with_bridge(self, close: Callable[[], Awaitable[object]]) -> Callable[[], None]:
        """Have ``close()`` awaited when the bridge closes, before its tasks are cancelled.

        Returns the function that takes it off again (call it once the thing is closed).
        """
        self._closers.add(close)
        return lambda: self._closers.discard(close)

    def to_trio(self, fn: Callable[..., object], *args: Any) -> None:
        """From the asyncio thread: run ``fn(*args)`` soon on the trio loop, without waiting."""
        if self._trio_token is None:
            return

        def run() -> None:  # an exception here would end the whole trio run: contain it
            try:
                fn(*args)
            except Exception:
                _log.exception("callback from the asyncio side failed: %r", fn)

        with contextlib.suppress(trio.RunFinishedError):
            self._trio_token.run_sync_soon(run)

    def submit(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """From any thread: start ``fn(*args)`` on the asyncio loop, fire and forget.

        Only for work whose lifetime the asyncio side owns (e.g. closing a peer connection
        during shutdown); it is cancelled by ``close()`` like every other task.
        """
        if self._loop is None or self._closing:
            return

        def start() -> None:
            task = asyncio.ensure_future(fn(*args))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(_retrieve)

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(start)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run coroutine ``fn(*args)`` on the asyncio loop; if cancelled, cancel and await it."""
        loop = self._loop
        if loop is None or self._closing:
            raise BridgeClosed("the asyncio bridge is closed")
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        holder: Future[asyncio.Future[T]] = Future()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finished.set)

        def start() -> None:
            task = asyncio.ensure_future(fn(*args))
            task.add_done_callback(wake)
            holder.set_result(task)

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError as exc:
            raise BridgeClosed("the asyncio bridge is closed") from exc
        try:
            await finished.wait()
        finally:
            if not finished.is_set():
                # Cancelled from trio: ``start`` ran first (FIFO), so the task exists.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(lambda: holder.result().cancel())
                with trio.CancelScope(shield=True):
                    await finished.wait()
        task = holder.result()
        if task.cancelled():
            raise BridgeClosed("the asyncio task was cancelled by the bridge shutting down")
        return task.result()


def closes_with_bridge(close: Callable[[], Awaitable[object]]) -> Callable[[], None]:
    """From a bridge's asyncio thread: its close awaits ``close()`` before the loop goes.

    Returns the function that takes ``close`` off again. Elsewhere (an asyncio loop that is
    not a bridge's, as in unit tests) nothing is registered.
    """
    bridge: AsyncioBridge | None = getattr(_this_thread, "bridge", None)
    if bridge is None or bridge._closing:
        return lambda: None
    return bridge.closes_with_bridge(close)


def sweeps_with_bridge(method: Callable[[], object]) -> None:
    """From a bridge's asyncio thread: call the bound ``method`` (synchronous, idempotent) as
    the bridge closes, after all its tasks are done, if its object is still alive."""
    bridge: AsyncioBridge | None = getattr(_this_thread, "bridge", None)
    if bridge is not None and not bridge._closing:
        bridge._sweeps = [w for w in bridge._sweeps if w() is not None]
        bridge._sweeps.append(weakref.WeakMethod(method))


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done-callback for tasks nobody awaits: their exception is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        _log.warning("asyncio task failed", exc_info=task.exception())


@contextlib.asynccontextmanager
async def open_bridge(name: str = "p2pfl-asyncio") -> AsyncIterator[AsyncioBridge]:
    """Start an asyncio loop thread for the duration of the ``async with`` block."""
    bridge = AsyncioBridge(name)
    bridge.start(trio.lowlevel.current_trio_token())
    try:
        yield bridge
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(bridge.close)
