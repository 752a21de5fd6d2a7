"""[limits] max_peers on 16 real daemons: at most 4 links each, always; all learn; and the links
heal into one connected graph when 4 daemons are killed.

Sixteen gossip daemons on digits in a bridged private network (mDNS finds everyone), each with
``max_peers = 4``. At every sample (``p2pfl status``), on every daemon: the active view plus the
links being opened hold at most 4 members, the links the driver sees up are at most 4, the links
and link attempts the transport holds are at most 4, and so is the most it ever held (the
daemon records it at each link decision and every 0.25 s). So the federation is not a full mesh;
every daemon learns (accuracy well above the 0.1 of chance); after 4 are SIGKILLed, the
survivors drop the dead links, promote members of their passive views, and their links form one
connected graph.
"""

from __future__ import annotations

import time
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

N, MAX_PEERS, KILLED = 16, 4, (0, 5, 10, 15)


def _links(status: NodeStatus) -> set[str]:
    return {p.node_id for p in status.peers if p.state == "connected"}


def _connected(graph: dict[str, set[str]]) -> bool:
    start = next(iter(graph))
    reached, frontier = {start}, [start]
    while frontier:
        for other in graph[frontier.pop()]:
            if other in graph and other not in reached:
                reached.add(other)
                frontier.append(other)
    return reached == set(graph)


def _check_bounds(statuses: dict[int, NodeStatus], seen: list[int]) -> None:
    for i, s in statuses.items():
        if s.sampling is None:  # still starting: the transport is not up yet
            continue
        sampling = s.sampling
        assert len(sampling["active"]) + len(sampling["reserved"]) <= MAX_PEERS, (i, sampling)
        assert s.node_id not in sampling["active"] and s.node_id not in sampling["passive"]
        assert len(_links(s)) <= MAX_PEERS, (i, _links(s))
        assert sampling["links"] <= MAX_PEERS, (i, sampling)
        assert sampling["largest"] <= MAX_PEERS, (i, sampling)
        seen.append(len(_links(s)))


def _statuses(cluster: DaemonCluster, nodes: list[int]) -> dict[int, NodeStatus]:
    out = {}
    for i in nodes:
        process = cluster.nodes[i].process
        if process is not None and process.poll() is not None:
            pytest.fail(f"node-{i} exited: {cluster.log_tail(i, 40)}")
        status = cluster.status(i)
        if status is not None:
            out[i] = status
    return out


def test_sixteen_daemons_with_four_peers_learn_and_stay_connected(
    short_tmp: Path, fork_server: ForkServer
) -> None:
    spec = ClusterSpec(
        n_nodes=N,
        protocol="gossip",
        aggregation=None,
        epochs=0.5,
        params={"max_peers": MAX_PEERS, "period": 1.0},
        peer_timeout_s=4.0,
        checkpoint_interval_s=60.0,
    )
    everyone = list(range(N))
    with (
        BridgedNetwork(N) as network,
        DaemonCluster(short_tmp, spec, network, fork_server=fork_server) as cluster,
    ):
        cluster.start_all()
        deadline = time.monotonic() + 240
        statuses: dict[int, NodeStatus] = {}
        seen_shuffles = False
        seen: list[int] = []  # links per daemon at every sample
        while time.monotonic() < deadline:
            statuses = _statuses(cluster, everyone)
            if len(statuses) == N:
                _check_bounds(statuses, seen)
                seen_shuffles = all(
                    s.sampling and s.sampling["shuffles"] >= 5 for s in statuses.values()
                )
                if seen_shuffles and all(
                    s.metric_value is not None and s.metric_value >= 0.6 and s.round >= 10
                    for s in statuses.values()
                ):
                    break
            time.sleep(1.0)
        else:
            logs = "\n".join(f"--- node-{i}\n{cluster.log_tail(i)}" for i in (0, 1))
            pytest.fail(
                "not every daemon learned: "
                + str({i: (s.round, s.metric_value, s.sampling) for i, s in statuses.items()})
                + logs
            )
        accuracy = {i: s.metric_value for i, s in statuses.items()}
        # Honest shuffles are not refused (a full share or an unanswered request, at most);
        # honest neighbour requests only by full daemons.
        refused = {k for s in statuses.values() for k in s.drops if k.startswith("update/")}
        assert refused <= {
            "update/shuffle_entry_over_share",
            "update/shuffle_timeout",
            "update/neighbour_full",
            "update/link_unreserved",
        }, refused
        degrees = sorted(len(_links(s)) for s in statuses.values())
        assert degrees[-1] < N - 1, degrees  # not a full mesh
        # Kill four; wait until no survivor holds a link to them, then check the links.
        killed_ids = {statuses[i].node_id for i in KILLED}
        for i in KILLED:
            cluster.kill(i)
        survivors = [i for i in everyone if i not in KILLED]
        deadline = time.monotonic() + 60
        graph: dict[str, set[str]] = {}
        while time.monotonic() < deadline:
            after = _statuses(cluster, survivors)
            if len(after) == len(survivors):
                _check_bounds(after, seen)
                graph = {s.node_id: _links(s) for s in after.values()}
                if not any(links & killed_ids for links in graph.values()) and _connected(graph):
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"the survivors' links never healed into one graph: {graph}")
        views = sorted(len(s.sampling["active"]) for s in after.values() if s.sampling)
        passive = sorted(len(s.sampling["passive"]) for s in after.values() if s.sampling)
        events = {
            k: sum(s.sampling["events"].get(k, 0) for s in after.values() if s.sampling)
            for k in ("asked", "evicted", "join_refused", "join_timeout")
        }
        print(
            f"accuracy {min(accuracy.values()):.3f}..{max(accuracy.values()):.3f}; links per "
            f"daemon {degrees} (every sample: {min(seen)}..{max(seen)}); after the kill: "
            f"active views {views}, passive {passive}, links "
            f"{sorted(len(v) for v in graph.values())}; survivors' link events {events}"
        )
