"""Hostile input against one real daemon (issue 11): does it stay up, refuse fast, keep its peer?

Two `p2pfl run` daemons gossip on digits in a bridged private network namespace; from a third
namespace an attacker sends, at a fixed rate, a rotation of what a stranger can send to the
signaling port: a reset right after connecting, a reset mid-frame, a half-close mid-frame, an
over-long length prefix, a frame of random bytes, a well-formed invite signed by a key outside the
federation, and connections held open without a byte (slowloris, released at the end).

Printed: tries, how many the daemon answered (should be none), whether it is still up, its RSS
before/after, the p50/p99 time from sending to the daemon's close (for the attacks it can see),
and the honest peer's delivery rate during the attack: model bytes the target received from its
peer over the bytes the peer sent it (target: daemon up 100 %, delivery >= 99 %). The baseline in
the same run is the same delivery ratio measured over an equally long quiet window before.

Needs root (or `python -m p2pfl.sim.netns -- ...`). Usage:
    python benchmarks/bench_hostile.py [--rate 20] [--seconds 20] [--held 200]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

from p2pfl.daemon.control import NodeStatus
from p2pfl.daemon.signaling import SignalingGuard
from p2pfl.identity import NodeIdentity
from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces
from p2pfl.sim.processes import ClusterSpec, DaemonCluster
from p2pfl.trust import TrustPolicy


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _signaling_port(cluster: DaemonCluster) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in cluster.nodes[0].log_path.read_text(errors="replace").splitlines():
            if "node started" in line:
                for field in line.split():
                    if field.startswith("signaling="):
                        return int(field.rsplit(":", 1)[1].strip('"'))
        time.sleep(0.2)
    raise SystemExit("node 0 never logged its signaling port")


def _status(cluster: DaemonCluster, i: int) -> NodeStatus:
    status = cluster.status(i, timeout=10)
    if status is None:
        raise SystemExit(f"node {i} does not answer: {cluster.log_tail(i, 30)}")
    return status


def _peer_bytes(status: NodeStatus, peer: str) -> tuple[int, int]:
    for p in status.peers:
        if p.node_id == peer:
            return p.bytes_in, p.bytes_out
    return 0, 0


def _delivery(cluster: DaemonCluster, seconds: float, during: object = None) -> float:
    """Bytes node 0 received from node 1 over bytes node 1 sent to node 0, in a window."""
    ids = [n.identity.node_id for n in cluster.nodes]
    in0, _ = _peer_bytes(_status(cluster, 0), ids[1])
    _, out1 = _peer_bytes(_status(cluster, 1), ids[0])
    if during is not None:
        during()  # type: ignore[operator]
    else:
        time.sleep(seconds)
    time.sleep(3)  # let messages in flight at the end of the window arrive
    in0b, _ = _peer_bytes(_status(cluster, 0), ids[1])
    _, out1b = _peer_bytes(_status(cluster, 1), ids[0])
    sent = out1b - out1
    return (in0b - in0) / sent if sent else float("nan")


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Attacker:
    def __init__(self, target: tuple[str, int], victim: NodeIdentity) -> None:
        self.target = target
        self.victim = victim
        self.guard = SignalingGuard(NodeIdentity.generate(), TrustPolicy.open())
        self.tries = 0
        self.answered = 0
        self.refused_s: list[float] = []
        self.held: list[socket.socket] = []

    def _until_closed(self, sock: socket.socket, sent_at: float) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self.answered += 1
        except OSError:
            pass  # a reset is a close too
        self.refused_s.append(time.perf_counter() - sent_at)
        sock.close()

    @property
    def invite(self) -> bytes:
        """A fresh, well-formed invite signed by a key outside the federation."""
        frame, _ = self.guard.seal_invite(
            self.victim.public_key, self.victim.node_id, 7000, time.time()
        )
        return struct.pack(">I", len(frame)) + frame

    def one(self, kind: int) -> None:
        self.tries += 1
        sock = socket.socket()
        sock.settimeout(30)
        try:
            sock.connect(self.target)
        except OSError:
            sock.close()  # refused at once (a cap): that counts as refused, not as a failure
            return
        with contextlib.suppress(OSError):
            if kind == 0:
                _reset(sock)
            elif kind == 1:
                sock.sendall(self.invite[:10])
                _reset(sock)
            elif kind == 2:
                sock.sendall(self.invite[:20])
                sent = time.perf_counter()
                sock.shutdown(socket.SHUT_WR)
                self._until_closed(sock, sent)
            elif kind == 3:
                sent = time.perf_counter()
                sock.sendall(struct.pack(">I", 1 << 30))
                self._until_closed(sock, sent)
            elif kind == 4:
                junk = os.urandom(300)
                sent = time.perf_counter()
                sock.sendall(struct.pack(">I", len(junk)) + junk)
                self._until_closed(sock, sent)
            elif kind == 5:
                sent = time.perf_counter()
                sock.sendall(self.invite)
                self._until_closed(sock, sent)
            else:
                self.held.append(sock)
                return
        if sock.fileno() >= 0 and kind not in (0, 1):
            sock.close()

    def run(self, rate: float, seconds: float, held: int) -> None:
        started = time.perf_counter()
        n = 0
        while time.perf_counter() - started < seconds:
            kind = n % 7
            if kind == 6 and len(self.held) >= held:
                kind = n % 6
            self.one(kind)
            n += 1
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        for sock in self.held:
            sock.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="attacks per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--held", type=int, default=200, help="slowloris connections held")
    args = parser.parse_args()
    if not can_create_namespaces():
        sys.exit("needs network namespaces (root, or python -m p2pfl.sim.netns -- ...)")
    spec = ClusterSpec(n_nodes=2, epochs=0.5, params={"period": 1.0}, peer_timeout_s=6.0)
    with (
        tempfile.TemporaryDirectory(prefix="p2pfl-hostile-", dir="/tmp") as tmp,
        BridgedNetwork(3) as network,
        DaemonCluster(Path(tmp), spec, network) as cluster,
    ):
        cluster.start_all()
        deadline = time.monotonic() + 180
        while True:
            s = [cluster.status(i) for i in (0, 1)]
            if all(x and x.round >= 3 and any(p.state == "connected" for p in x.peers) for x in s):
                break
            if time.monotonic() > deadline:
                sys.exit("the two daemons did not start learning")
            time.sleep(1)
        pid = cluster.nodes[0].process.pid  # type: ignore[union-attr]
        target = (cluster.nodes[0].address, _signaling_port(cluster))
        quiet = _delivery(cluster, args.seconds)
        rss_before = _rss_mib(pid)
        attacker = Attacker(target, cluster.nodes[0].identity)

        def attack() -> None:
            with network.enter(2):
                attacker.run(args.rate, args.seconds, args.held)

        during = _delivery(cluster, args.seconds, attack)
        time.sleep(5)
        up = cluster.nodes[0].process is not None and cluster.nodes[0].process.poll() is None
        rss_after = _rss_mib(pid) if up else float("nan")
        drops = _status(cluster, 0).drops if up else {}
        cluster.stop_all()
    print(f"attacks: {attacker.tries} at {args.rate:g}/s for {args.seconds:g} s")
    print(f"  answered by the daemon: {attacker.answered} (target 0)")
    print(f"  daemon up afterwards:   {'yes' if up else 'NO'} (target yes)")
    print(f"  RSS before/after:       {rss_before:.1f} / {rss_after:.1f} MiB")
    print(
        f"  time to refuse p50/p99: {_pct(attacker.refused_s, 0.5) * 1000:.1f} / "
        f"{_pct(attacker.refused_s, 0.99) * 1000:.1f} ms ({len(attacker.refused_s)} measured)"
    )
    print(f"  honest delivery, quiet window (baseline): {quiet * 100:.1f} %")
    print(f"  honest delivery, under attack:            {during * 100:.1f} % (target >= 99 %)")
    print("  drops counted by the daemon:")
    for key, n in sorted(drops.items()):
        print(f"    {key:45s} {n}")


if __name__ == "__main__":
    main()
