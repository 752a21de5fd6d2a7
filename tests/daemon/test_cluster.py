"""Real daemons in a private network namespace: gossip on digits, status, SIGKILL and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pfl.daemon.checkpoint import CheckpointStore, read_checkpoint
from p2pfl.daemon.control import NodeStatus
from p2pfl.sim.forkserver import ForkServer
from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces
from p2pfl.sim.processes import ClusterSpec, DaemonCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]


@pytest.fixture
def cluster(short_tmp: Path, fork_server: ForkServer) -> Iterator[DaemonCluster]:
    spec = ClusterSpec(
        n_nodes=3,
        epochs=0.5,
        params={"period": 1.0},
        peer_timeout_s=4.0,
        checkpoint_interval_s=1.0,
    )
    with (
        BridgedNetwork(3) as network,
        DaemonCluster(short_tmp, spec, network, fork_server=fork_server) as running,
    ):
        yield running


def _wait_for(
    cluster: DaemonCluster,
    condition: Callable[[list[NodeStatus | None]], bool],
    timeout: float,
    what: str,
) -> list[NodeStatus | None]:
    deadline = time.monotonic() + timeout
    statuses: list[NodeStatus | None] = []
    while time.monotonic() < deadline:
        statuses = [cluster.status(i) for i in range(len(cluster.nodes))]
        if condition(statuses):
            return statuses
        for node in cluster.nodes:
            if node.process is not None and node.process.poll() is not None:
                pytest.fail(f"{node.name} exited: {cluster.log_tail(node.index)}")
        time.sleep(0.5)
    logs = "\n".join(f"--- {n.name}\n{cluster.log_tail(n.index)}" for n in cluster.nodes)
    pytest.fail(f"timed out waiting for {what}: {statuses}\n{logs}")


def _connected(status: NodeStatus | None) -> set[str]:
    if status is None:
        return set()
    return {p.node_id for p in status.peers if p.state == "connected"}


def test_three_daemons_gossip_on_digits_and_each_improves(cluster: DaemonCluster) -> None:
    cluster.start_all()
    ids = [n.identity.node_id for n in cluster.nodes]
    first: dict[int, float] = {}

    def learning(statuses: list[NodeStatus | None]) -> bool:
        for i, s in enumerate(statuses):
            if s is not None and s.metric_value is not None:
                first.setdefault(i, s.metric_value)
        return all(
            s is not None
            and _connected(s) == set(ids) - {ids[i]}
            and s.round >= 8
            and s.metric_value is not None
            and s.metric_value >= 0.8
            for i, s in enumerate(statuses)
        )

    statuses = _wait_for(cluster, learning, 150, "3 connected nodes learning")
    for i, status in enumerate(statuses):
        assert status is not None
        assert status.metric_value is not None and status.metric_value > first[i]
        assert status.bytes_in > 0 and status.bytes_out > 0  # models really travelled
        assert status.rejected == {}
    # The operator's view: `p2pfl status --json` on a node lists the other two as connected.
    out = subprocess.run(
        [sys.executable, "-m", "p2pfl", "status", "--json", "--socket",
         str(cluster.nodes[0].socket_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    data = json.loads(out.stdout)
    assert {p["node_id"] for p in data["peers"] if p["state"] == "connected"} == set(ids[1:])
    assert data["trust_mode"] == "federation" and data["federation_id"]
    # Each peer shows its member name (from its certificate) and a heartbeat RTT.
    names = {n.identity.node_id: n.name for n in cluster.nodes}
    for peer in data["peers"]:
        assert peer["name"] == names[peer["node_id"]]
        assert peer["rtt_ms"] is not None and 0 < peer["rtt_ms"] < 1000
    table = subprocess.run(
        [sys.executable, "-m", "p2pfl", "status", "--socket", str(cluster.nodes[0].socket_path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert cluster.nodes[1].name in table and " ms" in table
    codes = cluster.stop_all(timeout=30)
    assert codes == {0: 0, 1: 0, 2: 0}


def test_sigkilled_daemon_resumes_from_its_checkpoint_and_rejoins(
    cluster: DaemonCluster,
) -> None:
    cluster.start_all()
    ids = [n.identity.node_id for n in cluster.nodes]
    _wait_for(
        cluster,
        lambda s: all(x is not None and x.round >= 3 and len(_connected(x)) == 2 for x in s),
        150,
        "3 connected nodes training",
    )
    victim = cluster.nodes[2]
    store = CheckpointStore(victim.state_dir / "checkpoints")
    _wait_for(cluster, lambda s: len(store.paths()) >= 2, 30, "two checkpoints")
    cluster.kill(2, signal.SIGKILL)
    assert cluster.wait(2, 10) == -signal.SIGKILL
    # Every checkpoint it left verifies; the newest is what it must resume from.
    for seq, path in store.paths():
        read_checkpoint(path, expected_seq=seq)
    newest, skipped = store.load_latest()
    assert newest is not None and skipped == []
    saved_round = int(newest.state["round"])
    # The others carry on without it.
    before = [cluster.status(i) for i in (0, 1)]
    _wait_for(
        cluster,
        lambda s: all(
            s[i] is not None and s[i].round > before[i].round + 2  # type: ignore[union-attr]
            for i in (0, 1)
        ),
        60,
        "the survivors to keep training",
    )
    cluster.start(2)
    statuses = _wait_for(
        cluster,
        lambda s: s[2] is not None and len(_connected(s[2])) == 2 and s[2].round > saved_round,
        150,
        "the restarted node to rejoin",
    )
    restarted = statuses[2]
    assert restarted is not None
    assert restarted.round > saved_round >= 1  # counted on from the checkpoint, not from 0
    assert _connected(restarted) == set(ids[:2])
    assert "resuming from checkpoint" in victim.log_path.read_text()
