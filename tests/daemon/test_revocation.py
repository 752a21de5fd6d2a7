"""Revoking a member: real daemons in a private namespace drop it and keep it out."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
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

Statuses = list[NodeStatus | None]


def _wait_for(
    cluster: DaemonCluster, condition: Callable[[Statuses], bool], timeout: float, what: str
) -> Statuses:
    deadline = time.monotonic() + timeout
    statuses: Statuses = []
    while time.monotonic() < deadline:
        statuses = [cluster.status(i, timeout=2) if n.running else None
                    for i, n in enumerate(cluster.nodes)]  # fmt: skip
        if condition(statuses):
            return statuses
        time.sleep(0.25)
    logs = "\n".join(f"--- {n.name}\n{cluster.log_tail(n.index, 40)}" for n in cluster.nodes)
    pytest.fail(f"timed out waiting for {what}: {statuses}\n{logs}")


def _connected(status: NodeStatus | None) -> set[str]:
    if status is None:
        return set()
    return {p.node_id for p in status.peers if p.state == "connected"}


def _drops(status: NodeStatus | None, key: str) -> int:
    return 0 if status is None else status.drops.get(key, 0)


def test_revoked_member_is_dropped_everywhere_after_sighup_and_stays_out_after_restart(
    short_tmp: Path, fork_server: ForkServer
) -> None:
    spec = ClusterSpec(n_nodes=3, epochs=0.2, params={"period": 3.0}, peer_timeout_s=4.0)
    with (
        BridgedNetwork(3) as network,
        DaemonCluster(short_tmp, spec, network, fork_server=fork_server) as cluster,
    ):
        cluster.start_all()
        ids = [n.identity.node_id for n in cluster.nodes]
        _wait_for(
            cluster,
            lambda s: all(_connected(x) == set(ids) - {ids[i]} for i, x in enumerate(s)),
            150,
            "three connected daemons",
        )
        # The operator revokes node 2 and hands the list to node 0 only (config + SIGHUP).
        victim = cluster.nodes[2]
        revocations = cluster.federation.revoke(
            {victim.identity.public_key: "test"}, serial=1, issued_at=time.time()
        )
        list_path = short_tmp / "revocations.list"
        list_path.write_bytes(revocations)
        first = cluster.nodes[0]
        text = first.config_path.read_text()
        first.config_path.write_text(
            text.replace("[trust]\n", f'[trust]\nrevocations = "{list_path}"\n', 1)
        )
        sighup_at = time.monotonic()
        cluster.kill(0, signal.SIGHUP)
        _wait_for(
            cluster,
            lambda s: ids[2] not in _connected(s[0]) | _connected(s[1]) and not _connected(s[2]),
            10,
            "node 0, and node 1 told by node 0, to drop the revoked node",
        )
        assert time.monotonic() - sighup_at < 10
        # Node 1 learnt the list over its link to node 0 and stored it; the two stay connected.
        second = cluster.nodes[1]
        stored = second.state_dir / "revocations.list"
        _wait_for(cluster, lambda s: stored.exists(), 10, "node 1 to store the list")
        assert stored.read_bytes() == revocations
        statuses = _wait_for(
            cluster, lambda s: _connected(s[0]) == {ids[1]}, 30, "nodes 0 and 1 still connected"
        )
        assert _connected(statuses[1]) == {ids[0]}
        for status in statuses[:2]:  # each closed its own link to node 2, counted once
            assert _drops(status, "trust/revoked") == 1
            assert status is not None and (status.revocation_serial, status.revoked) == (1, 1)
        for node in (first, second):
            log = node.log_path.read_text()
            assert "closing the link to" in log and "revoked" in log
        assert 'msg="revocation list adopted"' in second.log_path.read_text()

        # Restart node 1 with node 0 gone: its stored list alone keeps node 2 out.
        for index in (0, 1):
            cluster.kill(index, signal.SIGTERM)
            assert cluster.wait(index, 40) == 0
        cluster.start(1)
        statuses = _wait_for(cluster, lambda s: s[1] is not None, 120, "node 1 to restart")
        # Whichever of the two dials, node 1 refuses node 2 at signaling.
        statuses = _wait_for(
            cluster,
            lambda s: _drops(s[1], "signaling/untrusted_revoked") > 0,
            60,
            "the restarted node 1 to refuse node 2",
        )
        assert not _connected(statuses[1]) and not _connected(statuses[2])
        # The restarted node holds its stored list from the start (its status says so).
        assert statuses[1] is not None and statuses[1].revocation_serial == 1
