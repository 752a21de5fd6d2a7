"""The sender's CPU per SACK, lean handling against aiortc's, in one process without a network.

Run: ``.venv/bin/python benchmarks/bench_sack.py [--baseline REV] [--sacks N --rounds N]``.
One tuned SCTP transport (``p2pfl.daemon.sctp.TunedSctp``) in the state of a bulk sender: a
large message queued, a congestion window of 64 chunks in flight. Each SACK packet it is fed
(real bytes, checksummed, through ``_handle_data`` as from DTLS) acknowledges the next four
chunks, as a receiver that SACKs every fourth packet does; the transport then sends four more
(serialized, checksummed, handed to a DTLS stub that keeps nothing). Measured, each in a
fresh process, alternating, ``--rounds`` times: the tree through
``TunedSctp._p2pfl_clean_sack`` (the lean path), the tree with that path declining so that
aiortc's ``_receive_sack_chunk`` handles every SACK, and with ``--baseline REV`` that
revision's p2pfl (exported with ``git archive``). Printed: microseconds of process CPU per
SACK, including the four sends it triggers (medians and ranges); CPU time, so other load on
the machine weighs less than on wall-clock figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _baseline import export, run_in
from aiortc import RTCPeerConnection
from aiortc import rtcsctptransport as aiortc_sctp

from p2pfl.daemon import sctp

TAG = 0x1234ABCD
PER_SACK = 4  # chunks acknowledged per SACK (p2pfl's SACK_EVERY)
WINDOW = 64  # chunks in flight


def _sack(tsn: int) -> bytes:
    chunk = aiortc_sctp.SackChunk()
    chunk.cumulative_tsn, chunk.advertised_rwnd = tsn, 1 << 20
    return bytes(aiortc_sctp.serialize_packet(5000, 5000, TAG, chunk))


async def _run(sacks: int, lean: bool) -> float:
    pc = RTCPeerConnection()
    pc.createDataChannel("x")
    await asyncio.sleep(0)
    assert sctp.tune(pc)
    transport: Any = pc.sctp
    transport._local_verification_tag = TAG
    transport._remote_verification_tag = 0xCAFEF00D
    transport._local_port = transport._remote_port = 5000
    sent = [0]

    async def dtls_send(data: bytes) -> None:
        sent[0] += 1

    transport.transport._send_data = dtls_send
    if not lean:

        async def decline(cumulative_tsn: int) -> bool:
            return False

        transport._p2pfl_clean_sack = decline
    chunk_bytes = transport._p2pfl_chunk
    transport._ssthresh = 1 << 30
    transport._cwnd = WINDOW * chunk_bytes
    first = transport._local_tsn
    message = bytes(chunk_bytes * (sacks * PER_SACK + 2 * WINDOW))
    await transport._send(1, 53, message)  # queues the chunks, sends the first burst
    for _ in range(WINDOW // PER_SACK):  # aiortc sends four chunks per call beyond the flight
        await transport._transmit()
    assert transport._flight_size >= WINDOW * chunk_bytes, transport._flight_size
    packets = [_sack((first + (i + 1) * PER_SACK - 1) % 2**32) for i in range(sacks)]
    transport._cwnd = WINDOW * chunk_bytes  # slow start grows it: keep the window fixed
    start = time.process_time()
    for packet in packets:
        await transport._handle_data(packet)
        transport._cwnd = WINDOW * chunk_bytes
    elapsed = time.process_time() - start
    assert sent[0] >= WINDOW + sacks * PER_SACK, sent[0]  # four sent per SACK
    transport._t3_cancel()
    transport._sent_queue.clear()
    transport._outbound_queue.clear()
    await pc.close()
    return elapsed / sacks * 1e6


def _one(tree: Path | None, sacks: int, lean: bool) -> float:
    """One measurement in a fresh process, importing ``tree``'s p2pfl (None: the checkout's)."""
    call = f"import asyncio; print(asyncio.run(b._run({sacks}, {lean})))"
    return float(run_in(tree, "bench_sack", call))


def _line(label: str, values: list[float]) -> str:
    return (
        f"{label:34s} {statistics.median(values):6.2f} us per SACK "
        f"({min(values):.2f}-{max(values):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sacks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--baseline", help="git revision also measured, alternating")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}  (cores: {os.cpu_count()})")
    variants: list[tuple[str, Path | None, bool]] = [
        ("now, aiortc's _receive_sack_chunk", None, False),
        ("now, lean _p2pfl_clean_sack", None, True),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            variants.insert(0, (args.baseline, export(args.baseline, Path(tmp)), True))
        results: dict[str, list[float]] = {label: [] for label, _, _ in variants}
        for _ in range(args.rounds):
            for label, tree_path, lean in variants:
                results[label].append(_one(tree_path, args.sacks, lean))
    print(f"{args.rounds} rounds of {args.sacks} SACKs, alternating; medians (range):")
    for label, values in results.items():
        print(_line(label, values))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
