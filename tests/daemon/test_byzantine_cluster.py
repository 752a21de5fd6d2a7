"""A malicious member among four real daemons: multi-Krum holds, plain averaging falls.

Four daemons run FedAvg on digits in a bridged private network (node 0 aggregates); node 3 is an
admitted member running the attacking build of the daemon (``p2pfl.sim.attacker``): every update
it sends is its honest one times -100, signed with its own key. With multi-Krum told to expect one
Byzantine input (``krum_f = 1``, a [protocol] parameter; the default f for four inputs is 0, as
n >= 2f + 3 allows no more) the honest daemons end within 2 points of a clean run's accuracy;
with ``mean`` configured explicitly they follow the attacker.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from p2pfl.daemon.control import NodeStatus
from p2pfl.learning.attacks import Attack
from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces
from p2pfl.sim.processes import ClusterSpec, DaemonCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]

HONEST = [0, 1, 2]
ROUNDS = 20


def _honest_accuracy(root: Path, aggregation: str | None, attack: Attack | None) -> float:
    """The honest daemons' mean accuracy once each has reached round ``ROUNDS``."""
    spec = ClusterSpec(
        n_nodes=4,
        protocol="fedavg",
        epochs=0.5,
        aggregation=aggregation,
        # krum_f only where the rule reads it: the setup validator refuses it with "mean".
        params={"round_timeout": 3.0, **({"krum_f": 1} if aggregation == "multikrum" else {})},
        aggregator_index=0,
        start_peers=3,
        peer_timeout_s=6.0,
        attackers={3: attack} if attack is not None else {},
    )
    with BridgedNetwork(4) as network, DaemonCluster(root, spec, network) as cluster:
        cluster.start_all()
        deadline = time.monotonic() + 300
        statuses: dict[int, NodeStatus | None] = {}
        while time.monotonic() < deadline:
            statuses = {i: cluster.status(i) for i in HONEST}
            if all(
                s is not None and s.round >= ROUNDS and s.metric_value is not None
                for s in statuses.values()
            ):
                values = [s.metric_value for s in statuses.values() if s is not None]
                return sum(v for v in values if v is not None) / len(values)
            for i in range(4):
                process = cluster.nodes[i].process
                if process is not None and process.poll() is not None:
                    pytest.fail(f"node-{i} exited: {cluster.log_tail(i, 40)}")
            time.sleep(1.0)
        logs = "\n".join(f"--- node-{i}\n{cluster.log_tail(i)}" for i in range(4))
        pytest.fail(f"honest daemons did not reach round {ROUNDS}: {statuses}\n{logs}")


def test_one_insider_among_four_daemons_cannot_take_over_multikrum_fedavg(
    short_tmp: Path,
) -> None:
    attack = Attack("scale", factor=-100.0)
    clean = _honest_accuracy(short_tmp / "clean", "multikrum", None)
    attacked = _honest_accuracy(short_tmp / "attacked", "multikrum", attack)
    assert clean > 0.8
    assert attacked >= clean - 0.02, (clean, attacked)
    # The attack is real: the same insider takes plain averaging down.
    collapsed = _honest_accuracy(short_tmp / "mean", "mean", attack)
    assert collapsed < 0.5, (clean, collapsed)
