"""A minimal node process for tests and benchmarks: one PeerTransport driven over stdin/stdout.

Run inside a private namespace (``p2pfl.sim.netns``)::

    ip netns exec NS python -m p2pfl.sim.testnode --host 10.77.0.2 --seed SEEDHEX [options]

Output is JSON lines on stdout::

    {"event": "ready", "node_id": ..., "port": ...}
    {"event": "up", "peer": ...}
    {"event": "down", "peer": ..., "reason": ...}
    {"event": "message", "peer": ..., "size": ..., "sha256": ..., "at": ..., "verified": ...}
    {"event": "sent", "peer": ..., "size": ..., "sha256": ..., "elapsed_s": ...}
    {"event": "error", "what": ...}
    {"event": "counters", "counters": {...}}
    {"event": "lag", "p50_ms": ..., "p99_ms": ..., "max_ms": ..., "cpu_s": ...}

Commands are JSON lines on stdin::

    {"cmd": "send", "peer": ID, "size": N, "seed": K}   # N pseudo-random bytes from seed K
    {"cmd": "send", ..., "signed": true}                # ... sealed in a signed envelope
    {"cmd": "send", "peer": ID, "file": PATH}           # the bytes of a file
    {"cmd": "counters"}
    {"cmd": "lag"}      # trio loop lag p50/p99/max (ms) since the last "lag" command
    {"cmd": "quit"}

``--drop-pct`` / ``--delay-ms`` impair this process's outgoing ICE datagrams in user space (each
UDP packet aioice sends is dropped with that probability or delayed), for kernels without
``sch_netem``; with netem available, use ``BridgedNetwork.impair`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from p2pfl.daemon.transport import (
    MessageReceived,
    PeerDown,
    PeerTransport,
    PeerUnavailable,
    PeerUp,
    TransportConfig,
)
from p2pfl.identity import NodeIdentity
from p2pfl.trust import TrustPolicy
from p2pfl.wire import EnvelopeVerifier, WireError, seal

T = TypeVar("T")


def payload(size: int, seed: int) -> bytes:
    """Deterministic test payload (random.randbytes), made 1 MiB at a time: one randbytes call
    holds the GIL throughout (a quarter of a second for 64 MiB), which would stall the node's
    trio loop from the worker thread and show up in the loop-lag figures as the transport's."""
    rng = random.Random(seed)
    piece = 1 << 20
    return b"".join(rng.randbytes(min(piece, size - at)) for at in range(0, size, piece))


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _impair_datagrams(drop_pct: float, delay_ms: float, seed: int) -> None:
    """Drop/delay every UDP datagram aioice sends from this process (user-space netem)."""
    import asyncio

    from aioice import ice

    rng = random.Random(seed)

    async def send_data(self: Any, data: bytes, addr: tuple[str, int]) -> None:
        if rng.random() * 100 < drop_pct:
            return
        if delay_ms <= 0:
            self.transport.sendto(data, addr)
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(delay_ms / 1000, self.transport.sendto, data, addr)

    ice.StunProtocol.send_data = send_data  # type: ignore[method-assign]


class LoopLag:
    """Measures how late the trio loop wakes a task that sleeps ``interval_s`` at a time."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await trio.sleep(self.interval_s)
            self.samples.append(time.perf_counter() - before - self.interval_s)

    def summary(self, *, reset: bool) -> dict[str, float]:
        ordered = sorted(self.samples) or [0.0]
        if reset:
            self.samples = []

        def pick(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

        return {
            "p50_ms": pick(0.5),
            "p99_ms": pick(0.99),
            "max_ms": ordered[-1] * 1000,
            "cpu_s": time.process_time(),  # CPU seconds of this process so far (all threads)
        }


async def _commands(transport: PeerTransport, lag: LoopLag) -> None:
    stdin = trio.lowlevel.FdStream(0)
    buffer = b""
    async with trio.open_nursery() as nursery:
        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                nursery.cancel_scope.cancel()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = json.loads(line)
                if command["cmd"] == "quit":
                    nursery.cancel_scope.cancel()
                    return
                if command["cmd"] == "lag":
                    _emit(event="lag", **lag.summary(reset=True))
                elif command["cmd"] == "counters":
                    _emit(event="counters", counters=dict(transport.counters))
                elif command["cmd"] == "send":
                    nursery.start_soon(_send, transport, command)


def _prepare(transport: PeerTransport, command: dict[str, Any]) -> bytes:
    if "file" in command:
        data = Path(command["file"]).read_bytes()
    else:
        data = payload(command["size"], command.get("seed", 0))
    if command.get("signed"):
        data = seal(
            transport.identity,
            kind="test-payload",
            body=data,
            seq=time.time_ns() // 1000,
            now=time.time(),
        )
    return data


async def _send(transport: PeerTransport, command: dict[str, Any]) -> None:
    # Bulk CPU work (payload, signature, digests) off the trio thread, like a daemon must do,
    # so the loop-lag figures measure the transport.
    data, prepare_cpu_s = await trio.to_thread.run_sync(_timed, _prepare, transport, command)
    started = time.monotonic()
    try:
        await transport.send(command["peer"], data)
    except PeerUnavailable as exc:
        _emit(event="error", what=str(exc))
        return
    elapsed = time.monotonic() - started
    started_at = time.time() - elapsed
    digest, digest_cpu_s = await trio.to_thread.run_sync(_timed, _sha256, data)
    _emit(
        event="sent",
        peer=command["peer"],
        size=len(data),
        sha256=digest,
        started_at=started_at,
        elapsed_s=elapsed,
        # CPU the test itself spent (payload, signature, the digest above): not the transport's
        test_cpu_s=prepare_cpu_s + digest_cpu_s,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """``fn(*args)`` and the CPU seconds this thread spent on it."""
    started = time.thread_time()
    result = fn(*args)
    return result, time.thread_time() - started


def _verifies(verifier: EnvelopeVerifier, data: bytes) -> bool:
    try:
        verifier.open(data, now=time.time())
    except WireError:
        return False
    return True


async def _events(transport: PeerTransport, verifier: EnvelopeVerifier | None) -> None:
    async for event in transport.events:
        if isinstance(event, PeerUp):
            _emit(event="up", peer=event.peer)
        elif isinstance(event, PeerDown):
            _emit(event="down", peer=event.peer, reason=event.reason)
        elif isinstance(event, MessageReceived):
            arrived = time.time()
            digest, test_cpu_s = await trio.to_thread.run_sync(_timed, _sha256, event.data)
            verified = False
            if verifier is not None:
                verified, verify_cpu_s = await trio.to_thread.run_sync(
                    _timed, _verifies, verifier, event.data
                )
                test_cpu_s += verify_cpu_s
            _emit(
                event="message",
                peer=event.peer,
                size=len(event.data),
                sha256=digest,
                at=arrived,
                verified=verified,
                test_cpu_s=test_cpu_s,  # the digest and check above: not the transport's
            )


async def _main(args: argparse.Namespace) -> None:
    identity = NodeIdentity.from_seed(bytes.fromhex(args.seed))
    if args.allow:
        trust = TrustPolicy.allowlist(bytes.fromhex(key) for key in args.allow)
    else:
        trust = TrustPolicy.open()
    config = TransportConfig(
        host=args.host,
        signaling_port=args.port,
        mdns=not args.no_mdns,
        static_peers=tuple(args.static),
        peer_timeout_s=args.peer_timeout,
        frame_bytes=args.frame_bytes,
    )
    async with PeerTransport(identity, trust, config) as transport:
        _emit(event="ready", node_id=transport.node_id, port=transport.signaling_port)
        async with trio.open_nursery() as nursery:
            verifier = EnvelopeVerifier(is_trusted=lambda _key: True) if args.verify else None
            nursery.start_soon(_events, transport, verifier)
            lag = LoopLag()
            nursery.start_soon(lag.run)
            await _commands(transport, lag)
            nursery.cancel_scope.cancel()


def seed_for(i: int) -> bytes:
    """The identity seed of test node ``i`` (so tests know every node id in advance)."""
    return bytes([i + 1]) * 32


def identity_for(i: int) -> NodeIdentity:
    return NodeIdentity.from_seed(seed_for(i))


class NodeProcess:
    """Drives one testnode process from trio (tests, benchmarks, harness).

    ``command`` is the full argv (usually ``net.command(node_argv(...))`` to run it inside a
    namespace); ``run`` (via ``nursery.start``) starts it and collects its JSON events in
    ``self.events``; ``wait_for(predicate)`` waits for a matching event.
    """

    def __init__(self, command: list[str], index: int) -> None:
        self.command = command
        self.index = index
        self.identity = identity_for(index)
        self.node_id = self.identity.node_id
        self.events: list[dict[str, Any]] = []
        self.process: trio.Process | None = None
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.process = process = await trio.lowlevel.open_process(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        task_status.started()
        assert process.stdout is not None
        buffer = b""
        try:
            while True:
                chunk = await process.stdout.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._record(json.loads(line))
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
        self._record({"event": "exited", "code": process.returncode})

    def _record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def command_line(self, **command: Any) -> None:
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, start: int = 0
    ) -> dict[str, Any]:
        """First event from index ``start`` on matching ``predicate`` (bound it with fail_after)."""
        seen = start
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            await self._changed.wait()

    def count(self, kind: str, **match: Any) -> int:
        return sum(
            1
            for e in self.events
            if e["event"] == kind and all(e.get(k) == v for k, v in match.items())
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()


def node_argv(index: int, host: str, *extra: str) -> list[str]:
    """argv of test node ``index`` listening on ``host`` (extra: more testnode options)."""
    return [
        sys.executable,
        "-m",
        "p2pfl.sim.testnode",
        "--host",
        host,
        "--seed",
        seed_for(index).hex(),
        *extra,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2pfl.sim.testnode")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", required=True, help="32-byte identity seed, hex")
    parser.add_argument("--allow", action="append", default=[], help="trusted public key, hex")
    parser.add_argument("--static", action="append", default=[], help="static peer host:port")
    parser.add_argument("--no-mdns", action="store_true")
    parser.add_argument("--peer-timeout", type=float, default=6.0)
    parser.add_argument("--frame-bytes", type=int, default=256 * 1024)
    parser.add_argument("--verify", action="store_true", help="check messages as envelopes")
    parser.add_argument("--drop-pct", type=float, default=0.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.drop_pct or args.delay_ms:
        _impair_datagrams(args.drop_pct, args.delay_ms, seed=int(args.seed[:8], 16))
    trio.run(_main, args)


if __name__ == "__main__":
    main()
