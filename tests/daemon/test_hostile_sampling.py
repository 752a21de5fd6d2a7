"""Two admitted members attack their peers' views; the victims' links stay within ``max_peers``.

Eight gossip daemons on digits in a bridged private network, ``max_peers = 3``; nodes 6 and 7 run
the test-only hostile build (``tests/daemon/_hostile_sampling.py``): they dial every member with
high priority, ask again at once when refused, close and re-ask every 2 s to force evictions, and
send every linked member a stream of hostile shuffles (20 a second: naming themselves and each
other, the receiver, a non-member, too many entries, and unsolicited replies). At every sample
each honest daemon holds at most 3 links (the driver's, the transport's and the most it ever
held), its active view and reserved slots at most 3, no non-member in either view, and no peer
placed more than its share of the passive view; the refusals are counted by reason; and the
honest daemons still learn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from p2pfl.daemon.control import NodeStatus
from p2pfl.protocols import SamplingConfig
from p2pfl.sim.forkserver import ForkServer
from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces
from p2pfl.sim.processes import ClusterSpec, DaemonCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]

N, MAX_PEERS, HOSTILE = 8, 3, (6, 7)
HONEST = [i for i in range(N) if i not in HOSTILE]
SHARE = SamplingConfig(view_size=MAX_PEERS).share
HOSTILE_BUILD = Path(__file__).with_name("_hostile_sampling.py")


def _start_hostile(cluster: DaemonCluster, network: BridgedNetwork, index: int) -> None:
    node = cluster.nodes[index]
    colluders = [cluster.nodes[i].identity.node_id for i in HOSTILE]
    argv = [sys.executable, str(HOSTILE_BUILD), json.dumps(colluders)]
    argv += ["--config", str(node.config_path)]
    node.log_file = open(node.log_path, "ab")  # noqa: SIM115 (closed by the cluster)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    node.process = subprocess.Popen(
        network.command(index, argv),
        stdout=node.log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _check(i: int, s: NodeStatus, members: set[str], hostile: set[str]) -> None:
    sampling = s.sampling
    assert sampling is not None
    links = {p.node_id for p in s.peers if p.state == "connected"}
    assert len(links) <= MAX_PEERS, (i, links)
    assert sampling["links"] <= MAX_PEERS and sampling["largest"] <= MAX_PEERS, (i, sampling)
    assert len(sampling["active"]) + len(sampling["reserved"]) <= MAX_PEERS, (i, sampling)
    assert set(sampling["active"]) | set(sampling["passive"]) <= members - {s.node_id}
    assert all(n <= SHARE for n in sampling["placed"].values()), (i, sampling)


def test_hostile_members_cannot_fill_a_view_or_pass_the_bound(
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
    with (
        BridgedNetwork(N) as network,
        DaemonCluster(short_tmp, spec, network, fork_server=fork_server) as cluster,
    ):
        members = {node.identity.node_id for node in cluster.nodes}
        hostile = {cluster.nodes[i].identity.node_id for i in HOSTILE}
        for i in HONEST:
            cluster.start(i)
        for i in HOSTILE:
            _start_hostile(cluster, network, i)
        deadline = time.monotonic() + 240
        statuses: dict[int, NodeStatus] = {}
        samples = 0
        hostile_links = 0
        while time.monotonic() < deadline:
            for i in range(N):
                process = cluster.nodes[i].process
                if process is not None and process.poll() is not None:
                    pytest.fail(f"node-{i} exited: {cluster.log_tail(i, 40)}")
            statuses = {i: s for i in HONEST if (s := cluster.status(i)) is not None}
            ready = {i: s for i, s in statuses.items() if s.sampling is not None}
            for i, s in ready.items():
                _check(i, s, members, hostile)
                hostile_links += len(set(s.sampling["active"]) & hostile)  # type: ignore[index]
            samples += len(ready) == len(HONEST)
            drops: Counter[str] = Counter()
            for s in statuses.values():
                drops.update(s.drops)
            attacked = all(
                drops[k] > 0
                for k in (
                    "update/shuffle_flood",
                    "update/shuffle_names_receiver",
                    "update/shuffle_unknown_member",
                    "update/shuffle_oversized",
                    "update/shuffle_unsolicited_reply",
                )
            )
            learned = len(statuses) == len(HONEST) and all(
                s.metric_value is not None and s.metric_value >= 0.5 and s.round >= 5
                for s in statuses.values()
            )
            if attacked and learned and samples >= 10 and hostile_links > 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail(
                f"not attacked and learned: {dict(drops)} "
                + str({i: (s.round, s.metric_value, s.sampling) for i, s in statuses.items()})
                + f"\n--- node-6\n{cluster.log_tail(6, 30)}"
            )
        evicted = sum(s.sampling["events"].get("evicted", 0) for s in statuses.values())  # type: ignore[index]
        refused = {k: v for k, v in sorted(drops.items()) if k.startswith(("update/", "link/"))}
        print(
            f"{samples} samples of all {len(HONEST)} honest daemons, links <= {MAX_PEERS} in "
            f"each; evictions {evicted}; refusals {refused}; accuracy "
            f"{sorted(round(s.metric_value or 0, 3) for s in statuses.values())}"
        )
