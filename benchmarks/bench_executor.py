"""Worker thread vs. worker process for training, while a real WebRTC transfer runs.

The daemon trains while it sends and receives models over aiortc data channels, whose SCTP stack
is pure Python. In one process, training in a thread and the transfer share the GIL. This
measures, for the same training job:

- training alone in a worker thread (``Executor``), and a transfer alone (baselines);
- training in a worker thread while the transfer runs in the same process;
- training in the executor's worker process (``Executor(mode="process")``: spawned once, weights
  passed through a shared-memory state_dict), while the transfer runs in this process.

For each: training samples/s and transfer MB/s. The transfer is a loopback aiortc pair (two
RTCPeerConnections, one data channel, 64 KiB messages with bufferedAmount backpressure) on an
asyncio loop in its own thread, like the daemon's bridge. It runs in a private network namespace:
the script re-executes itself under ``unshare --net`` (root), brings ``lo`` up and adds
127.0.0.2/8 (aioice ignores 127.0.0.1); ICE has no servers, so nothing leaves the machine.

Run: ``sudo .venv/bin/python benchmarks/bench_executor.py`` (about four minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

_MARK = "P2PFL_BENCH_NETNS"
REPEATS = 3


def _enter_private_netns() -> None:
    if os.environ.get(_MARK) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], check=True)
        return
    if os.geteuid() != 0:
        sys.exit("bench_executor needs root for `unshare --net` (a private network namespace)")
    env = {**os.environ, _MARK: "1"}
    os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, *sys.argv], env)


class Transfer:
    """A loopback aiortc data-channel transfer on its own asyncio thread; counts bytes received."""

    def __init__(self) -> None:
        self.received = 0
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="aiortc", daemon=True)

    def __enter__(self) -> Transfer:
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError(f"aiortc pair did not connect in 30 s ({self.error!r})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        config = RTCConfiguration(iceServers=[])  # no STUN: nothing leaves the namespace
        sender, receiver = RTCPeerConnection(config), RTCPeerConnection(config)
        channel = sender.createDataChannel("bench")
        opened, low = asyncio.Event(), asyncio.Event()

        @receiver.on("datachannel")
        def _on_channel(incoming: Any) -> None:
            @incoming.on("message")
            def _on_message(message: bytes) -> None:
                self.received += len(message)

        channel.on("open", opened.set)
        channel.on("bufferedamountlow", low.set)
        channel.bufferedAmountLowThreshold = 1 << 20
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        await asyncio.wait_for(opened.wait(), 20)
        self.ready.set()
        payload = b"\x00" * 65536
        while not self.stop.is_set():
            while channel.bufferedAmount < 4 << 20:
                channel.send(payload)
            low.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(low.wait(), 0.2)
        await sender.close()
        await receiver.close()


def _measure(label: str, run: Any, transfer: Transfer | None) -> dict[str, float]:
    import trio

    before, started = (transfer.received if transfer else 0), time.perf_counter()
    report = trio.run(run)
    wall = time.perf_counter() - started
    mbps = ((transfer.received - before) / wall / 1e6) if transfer else float("nan")
    row = {"samples_per_s": report.samples / wall, "transfer_mb_s": mbps, "wall_s": wall}
    print(
        f"  {label:<34} train {row['samples_per_s']:9,.0f} samples/s   "
        f"transfer {mbps:6.1f} MB/s   ({wall:.1f} s)",
        flush=True,
    )
    return row


def bench(
    spec: tuple[str, dict[str, Any], int], epochs: float, threads: int
) -> dict[str, dict[str, float]]:
    import torch

    from p2pfl.ml import Executor, load_task

    torch.set_num_threads(threads)
    name, options, node = spec
    task = load_task(name, **options)
    data = task.node_data(node, task.n_nodes)
    weights = task.make_model().state_dict()
    thread = Executor(task, threads=threads, mode="thread")
    thread.warm_up(data)
    started = time.perf_counter()
    process = Executor(task, threads=threads, mode="process")
    process.warm_up(data)  # spawn + import + first step, not part of the figures
    print(
        f"  worker process ready in {time.perf_counter() - started:.1f} s (spawn, import, warm-up)"
    )

    async def thread_job() -> Any:
        return (await thread.train(weights, data, epochs=epochs))[1]

    async def process_job() -> Any:
        return (await process.train(weights, data, epochs=epochs))[1]

    rows: dict[str, list[dict[str, float]]] = {k: [] for k in ("thread+t", "process+t", "t")}
    with Transfer() as transfer:
        time.sleep(1.0)
        for _ in range(REPEATS):  # interleaved, so the machine's other load hits all alike
            before, t0 = transfer.received, time.perf_counter()
            time.sleep(2.0)
            alone = (transfer.received - before) / (time.perf_counter() - t0) / 1e6
            print(f"  {'transfer alone':<34} {'':>25}   transfer {alone:6.1f} MB/s")
            rows["t"].append({"transfer_mb_s": alone})
            rows["thread+t"].append(_measure("worker thread + transfer", thread_job, transfer))
            rows["process+t"].append(_measure("worker process + transfer", process_job, transfer))
    rows["thread"] = [_measure("worker thread alone", thread_job, None)]
    rows["process"] = [_measure("worker process alone", process_job, None)]
    process.close()
    return rows


def main() -> None:
    _enter_private_netns()
    threads = 1
    workloads = [
        ("digits MLP (small ops)", ("digits", {"n_nodes": 1}, 0), 10.0),
        (
            "STGCN, METR-LA cloudlet 3 (39 sensors)",
            ("traffic-metr-la", {"n_nodes": 7, "days": 3}, 3),
            0.25,
        ),
    ]
    summary = []
    for label, spec, epochs in workloads:
        print(f"{label}: {epochs:g} epochs, {threads} torch thread per worker, 2-core machine")
        summary.append((label, bench(spec, epochs, threads)))
    print(f"\nmedians of {REPEATS} interleaved runs (higher is better):")
    for label, rows in summary:

        def med(key: str, field: str, rows: dict[str, list[dict[str, float]]] = rows) -> float:
            return statistics.median(r[field] for r in rows[key])

        print(f"  {label}")
        print(f"    transfer alone             {med('t', 'transfer_mb_s'):6.1f} MB/s")
        for key, name in (("thread+t", "thread + transfer"), ("process+t", "process + transfer")):
            print(
                f"    {name:<26} {med(key, 'transfer_mb_s'):6.1f} MB/s   "
                f"train {med(key, 'samples_per_s'):9,.0f} samples/s"
            )
        print(
            f"    process/thread during transfer: training "
            f"{med('process+t', 'samples_per_s') / med('thread+t', 'samples_per_s'):.2f}x, "
            f"transfer {med('process+t', 'transfer_mb_s') / med('thread+t', 'transfer_mb_s'):.2f}x"
        )


if __name__ == "__main__":
    main()
