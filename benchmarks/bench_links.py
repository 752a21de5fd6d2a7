"""CPU per byte of the data-channel stack alone: two RtcLinks on one asyncio loop, one process.

Run (as root, or under ``python -m p2pfl.sim.netns``):
``.venv/bin/python benchmarks/bench_links.py [--baseline REV] [--mb 32 --rounds 10]``.
Two ``RtcLink``s (``p2pfl.daemon.datachannel``, tuned as a daemon tunes them) connect over ICE
on loopback inside a private namespace (``SharedNetwork``), in one process and on one asyncio
loop; after a warm-up message, one message of ``--mb`` MiB goes from one to the other. Measured:
the process's CPU time from the send to the message's arrival, both ends together, with none of
a node around them (no trio thread, no loop-lag sampler, no payload generation), so the figure
moves with the per-datagram work of SCTP, DTLS and ICE and less with the machine's load than
``bench_transport.py``'s. With ``--baseline REV`` each round also runs that revision's p2pfl
(exported with ``git archive``), alternating, each run in a fresh process; printed: CPU seconds
and MB per CPU-second, medians and ranges, and the median of the paired ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _baseline import export, run_in

from p2pfl.sim.netns import can_create_namespaces, run_in_private_userns

MIB = 1024 * 1024
MB = 1e6


async def _transfer(size: int) -> float:
    from p2pfl.daemon.datachannel import LinkSettings, RtcLink

    arrived = asyncio.Event()
    sizes: list[int] = []

    def on_message(message: bytes) -> None:
        sizes.append(len(message))
        arrived.set()

    def link(on_message: object) -> RtcLink:
        return RtcLink(
            LinkSettings(),
            on_message=on_message,  # type: ignore[arg-type]
            on_down=lambda reason: None,
            on_drop=lambda reason: None,
        )

    sender, receiver = link(lambda message: None), link(on_message)
    try:
        await sender.accept_answer(await receiver.accept_offer(await sender.create_offer()))
        async with asyncio.timeout(30):
            await asyncio.gather(sender.wait_open(), receiver.wait_open())
        payload = os.urandom(MIB) * (size // MIB)
        await sender.send_message(os.urandom(100_000))  # warm-up
        async with asyncio.timeout(30):
            await arrived.wait()
        arrived.clear()
        start = time.process_time()
        await sender.send_message(payload)
        async with asyncio.timeout(300):
            await arrived.wait()
        cpu = time.process_time() - start
        assert sizes == [100_000, len(payload)], sizes
        return cpu
    finally:
        await asyncio.gather(sender.close(), receiver.close())


def _measure(size: int) -> float:
    """One transfer in a private namespace; the CPU seconds it took."""
    from p2pfl.daemon.bridge import new_event_loop
    from p2pfl.sim.netns import SharedNetwork

    net = SharedNetwork(2)
    try:
        with net.enter(), asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(_transfer(size))
    finally:
        net.close()


def _one(tree: Path | None, size: int) -> float:
    """One measurement in a fresh process, importing ``tree``'s p2pfl (None: the checkout's)."""
    return float(run_in(tree, "bench_links", f"print(b._measure({size}))"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32, help="message size, MiB")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--baseline", help="git revision also measured, alternating")
    args = parser.parse_args()
    if not can_create_namespaces():
        sys.exit(run_in_private_userns([sys.executable, *sys.argv]))
    size = args.mb * MIB
    print(f"load average before: {os.getloadavg()}  (cores: {os.cpu_count()})")
    with tempfile.TemporaryDirectory() as tmp:
        trees: dict[str, Path | None] = {"now": None}
        if args.baseline:
            trees = {args.baseline: export(args.baseline, Path(tmp)), "now": None}
        results: dict[str, list[float]] = {label: [] for label in trees}
        for _ in range(args.rounds):
            for label, tree_path in trees.items():
                results[label].append(_one(tree_path, size))
    print(f"{args.rounds} rounds of one {args.mb} MiB message, both ends' CPU; medians (range):")
    for label, values in results.items():
        rates = [size / MB / v for v in values]
        print(
            f"  {label:10s} {statistics.median(values):5.2f} CPU-s "
            f"({min(values):.2f}-{max(values):.2f}), {statistics.median(rates):5.1f} MB per "
            f"CPU-second ({min(rates):.1f}-{max(rates):.1f})"
        )
    if args.baseline:
        ratios = [n / b for b, n in zip(results[args.baseline], results["now"], strict=True)]
        print(
            f"  CPU now / {args.baseline}, paired: median {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f})"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
