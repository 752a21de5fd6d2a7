"""The receiver's read path per datagram: the event loop's UDP transport against GroTransport.

Run: ``.venv/bin/python benchmarks/bench_gro.py [--batches 60 --rounds 15]``.
One process, one event loop (``p2pfl.daemon.bridge.new_event_loop``: uvloop's where installed),
loopback. A socket opened by ``create_datagram_endpoint`` as aioice opens its own, read either
by the event loop's transport or, after ``p2pfl.daemon.dtls.read_coalesced``, by
``GroTransport`` with UDP GRO on. ``--batches`` batches of 14 records of 1,400 bytes (what a
tuned sender hands the kernel per flush in a transfer) are queued in the socket first, sent
through UDP GSO as a tuned sender sends them, or one ``sendto`` each as a peer without GSO
sends them; then the loop runs until the protocol (a counter) has every datagram. Measured:
process CPU per datagram of that read phase alone (the read system calls, the transport and
the protocol call; on loopback the receiving side's kernel work is done at send time, outside
the measurement). Each round runs the four combinations, alternating; printed: medians and
ranges, and the paired ratio GroTransport / event loop's transport per kind of peer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time
from typing import Any

from p2pfl.daemon import dtls
from p2pfl.daemon.bridge import new_event_loop

RECORDS, RECORD_BYTES = 14, 1400


class _Counter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.count = 0
        self.want = 0
        self.done = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.count += 1
        if self.count >= self.want:
            self.done.set()


async def _read(gro: bool, gso_peer: bool, batches: int) -> tuple[float, int]:
    """CPU microseconds per datagram read, and datagrams lost (a receive buffer too small)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(_Counter, local_addr=("127.0.0.1", 0))
    raw = protocol.transport.get_extra_info("socket")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
    if gro and not dtls.read_coalesced(protocol):
        raise SystemExit("UDP GRO refused by this kernel")
    address = protocol.transport.get_extra_info("sockname")
    records = [os.urandom(RECORD_BYTES)] * RECORDS
    protocol.want = batches * RECORDS
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(batches):  # all queued before the loop reads any
            if gso_peer:
                dtls.send_segments(sender, records, address)
            else:
                for record in records:
                    sender.sendto(record, address)
        start = time.process_time()
        try:
            async with asyncio.timeout(5):
                await protocol.done.wait()
        except TimeoutError:
            pass
        spent = time.process_time() - start
    protocol.transport.close()
    return spent / max(protocol.count, 1) * 1e6, protocol.want - protocol.count


async def main(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()}  (cores: {os.cpu_count()})")
    results: dict[tuple[bool, bool], list[float]] = {}
    lost = 0
    for _ in range(args.rounds):
        for gso_peer in (True, False):
            for gro in (False, True):
                per_datagram, missing = await _read(gro, gso_peer, args.batches)
                results.setdefault((gso_peer, gro), []).append(per_datagram)
                lost += missing
    print(
        f"{args.rounds} rounds of {args.batches * RECORDS} datagrams of {RECORD_BYTES} bytes "
        "queued, then read; process CPU per datagram, medians (range):"
    )
    for gso_peer in (True, False):
        peer = "a peer sending through GSO" if gso_peer else "a peer without GSO"
        for gro in (False, True):
            runs = results[(gso_peer, gro)]
            reader = "GroTransport (UDP GRO)   " if gro else "the event loop's transport"
            print(
                f"  {peer:<27} {reader}  {statistics.median(runs):5.2f} us "
                f"({min(runs):.2f}-{max(runs):.2f})"
            )
        on, off = results[(gso_peer, True)], results[(gso_peer, False)]
        pairs = [a / b for a, b in zip(on, off, strict=True)]
        print(f"  {'':<27} GroTransport / event loop's, paired: {statistics.median(pairs):.3f}")
    if lost:
        print(f"datagrams lost on a full receive buffer (lower --batches): {lost}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60, help="GSO batches of 14 per round")
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main(arguments))
