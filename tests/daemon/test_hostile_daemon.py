"""A real daemon under attack keeps running, keeps its honest peer and keeps learning.

Two daemons gossip on digits in a bridged private network; an attacker in a third namespace
goes after node 0, whose descriptor limit is cut to 1,024 from outside (``prlimit``) and whose
signaling caps are opened wide, so that only the descriptor budget stands between 1,100 held
connections and EMFILE. Before this was fixed, one reset to the signaling port ended the daemon.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfl.daemon.control import NodeStatus
from p2pfl.sim.forkserver import ForkServer
from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces
from p2pfl.sim.processes import ClusterSpec, DaemonCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture
def cluster(
    short_tmp: Path, fork_server: ForkServer
) -> Iterator[tuple[DaemonCluster, BridgedNetwork]]:
    spec = ClusterSpec(n_nodes=2, epochs=0.5, params={"period": 1.0}, peer_timeout_s=6.0)
    with (
        BridgedNetwork(3) as network,
        DaemonCluster(short_tmp, spec, network, fork_server=fork_server) as running,
    ):
        config = running.nodes[0].config_path
        wide_open = (
            "signaling_connections = 5000\nsignaling_per_source = 5000\n"
            "signaling_read_timeout_s = 60.0\n"
        )
        config.write_text(config.read_text().replace("[limits]\n", "[limits]\n" + wide_open))
        yield running, network


def _wait(cluster: DaemonCluster, check: object, timeout: float, what: str) -> NodeStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process = cluster.nodes[0].process
        assert process is not None and process.poll() is None, cluster.log_tail(0, 40)
        status = cluster.status(0)
        if status is not None and check(status):  # type: ignore[operator]
            return status
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}: {cluster.log_tail(0, 40)}")


def _connected(status: NodeStatus) -> int:
    return sum(1 for p in status.peers if p.state == "connected")


def test_resets_and_1100_held_connections_do_not_stop_a_daemon_with_1024_descriptors(
    cluster: tuple[DaemonCluster, BridgedNetwork],
) -> None:
    daemons, network = cluster
    daemons.start_all()
    status = _wait(daemons, lambda s: _connected(s) == 1 and s.round >= 3, 150, "learning")
    process = daemons.nodes[0].process
    assert process is not None
    resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    rss_before = _rss_mib(process.pid)
    round_before = status.round
    target = (daemons.nodes[0].address, status_port(daemons))

    held: list[socket.socket] = []
    try:
        with network.enter(2):
            for _ in range(20):  # a reset right after connecting, and one mid-frame
                sock = socket.create_connection(target, timeout=5)
                _reset(sock)
                sock = socket.create_connection(target, timeout=5)
                sock.sendall(b"\x00\x00")
                _reset(sock)
            for _ in range(1100):
                sock = socket.socket()
                held.append(sock)
                sock.settimeout(5)
                with contextlib.suppress(OSError):  # refused ones are reset: fine
                    sock.connect(target)
                    sock.sendall(b"\x00")
        # The daemon sheds instead of failing, while everything is held open.
        shed = _wait(
            daemons,
            lambda s: s.drops.get("resource/descriptor_budget", 0) > 0,
            60,
            "the descriptor budget to refuse connections",
        )
        assert _connected(shed) == 1
    finally:
        for sock in held:
            sock.close()
    # Learning goes on with the honest peer, and the refusals are named.
    after = _wait(
        daemons, lambda s: _connected(s) == 1 and s.round >= round_before + 3, 90, "more rounds"
    )
    assert after.drops.get("signaling/reset", 0) + after.drops.get("signaling/truncated", 0) >= 20
    assert not [k for k in after.drops if "/error_" in k], after.drops
    time.sleep(3)
    rss_after = _rss_mib(process.pid)
    print(f"RSS before {rss_before:.1f} MiB, after {rss_after:.1f} MiB")
    assert rss_after - rss_before < 20, (rss_before, rss_after)
    codes = daemons.stop_all(timeout=30)
    assert codes[0] == 0, daemons.log_tail(0, 40)


def status_port(daemons: DaemonCluster) -> int:
    """Node 0's signaling port, from its log line ``node started ... signaling=HOST:PORT``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in daemons.nodes[0].log_path.read_text(errors="replace").splitlines():
            if 'msg="node started"' in line or "node started" in line:
                for field in line.split():
                    if field.startswith("signaling="):
                        return int(field.rsplit(":", 1)[1].strip('"'))
        time.sleep(0.2)
    raise AssertionError("no signaling port in the log")
