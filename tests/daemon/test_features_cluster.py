"""Real cloudlet daemons: each holds its own sensors' file; the halo comes from the owners.

Cloudlet 0 of METR-LA needs halo readings from cloudlets 3 and 6. Only daemons 0 and 6 run:
6 serves altered readings (its file +10 mph), 3 never answers. Daemon 0 must train on exactly
what 6 sent, wait for 3 until its deadline, then train with 3's sensors masked and say so.
Both replay their test split live: 6 pushes each step to 0, which forecasts and scores itself.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from p2pfl.cli import main as cli_main
from p2pfl.daemon.control import NodeStatus
from p2pfl.ml.forecast import TrafficTask
from p2pfl.sim.forkserver import ForkServer
from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces
from p2pfl.sim.processes import ClusterSpec, DaemonCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]

REQUESTER, LIAR, SILENT = 0, 6, 3
TIMEOUT_S = 4.0
# 5-minute steps per second: the 2 days' test split (86 steps) in ~11 s. The liar pushes only
# while its replay runs, so the link must come up inside it: at 20 steps/s (~4 s) a full-suite
# run once saw the replay end before the link did (no push received).
REPLAY_SPEED = 8.0


def _wait_for(
    cluster: DaemonCluster,
    index: int,
    condition: Callable[[NodeStatus], bool],
    timeout: float,
    what: str,
) -> NodeStatus:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = cluster.status(index)
        if status is not None and condition(status):
            return status
        for node in cluster.nodes:
            if node.process is not None and node.process.poll() is not None:
                pytest.fail(f"{node.name} exited: {cluster.log_tail(node.index)}")
        time.sleep(0.3)
    logs = "\n".join(
        f"--- {n.name}\n{cluster.log_tail(n.index)}" for n in cluster.nodes if n.process
    )
    pytest.fail(f"timed out waiting for {what}: {status}\n{logs}")


def _use_file(config: Path, data: Path) -> None:
    text = config.read_text()
    text = re.sub(
        r"^\[task\]\n",
        f'[task]\ndata = "{data}"\nfeatures_timeout_s = {TIMEOUT_S}\n',
        text,
        count=1,
        flags=re.M,
    )
    config.write_text(text + f"\n[data]\nreplay_speed = {REPLAY_SPEED}\n")


def test_halo_readings_come_from_their_owners_and_a_silent_owner_is_masked(
    short_tmp: Path, fork_server: ForkServer
) -> None:
    split = short_tmp / "split"
    result = CliRunner().invoke(
        cli_main, ["data", "split", "--synthetic", "2", "--out", str(split)]
    )
    assert result.exit_code == 0, result.output
    with np.load(split / f"cloudlet-{LIAR}.npz") as f:
        speeds, sensor_ids = f["speeds"], f["sensor_ids"]
    with np.load(split / f"cloudlet-{REQUESTER}.npz") as f:
        others, other_ids = f["speeds"], f["sensor_ids"]
    # The liar's file: its own sensors +10 mph, and the requester's sensors, which it must ignore.
    altered = split / "altered.npz"
    np.savez(
        altered,
        speeds=np.concatenate([np.where(speeds > 0, speeds + 10.0, 0.0), others], axis=1),
        sensor_ids=np.concatenate([sensor_ids, other_ids]),
    )

    full = TrafficTask(days=2)
    halo = full.partition.halos[REQUESTER]
    owner = full.partition.owner
    from_liar = [int(s) for s in halo if owner[s] == LIAR]
    from_silent = [int(s) for s in halo if owner[s] == SILENT]
    assert from_liar and from_silent and len(from_liar) + len(from_silent) == len(halo)
    sent = full.windows.raw[:, from_liar] + 10.0  # what the liar's file holds for them
    expected_mean = float(np.nanmean(sent))
    honest_mean = float(np.nanmean(full.windows.raw[:, from_liar]))

    spec = ClusterSpec(
        n_nodes=7,
        task="traffic-metr-la",
        epochs=0.05,
        batch_size=16,
        exchange_features=True,
        params={"period": 1.0},
        peer_timeout_s=4.0,
    )
    with (
        BridgedNetwork(7) as network,
        DaemonCluster(short_tmp, spec, network, fork_server=fork_server) as cluster,
    ):
        ids = [n.identity.node_id for n in cluster.nodes]
        _use_file(cluster.nodes[REQUESTER].config_path, split / f"cloudlet-{REQUESTER}.npz")
        _use_file(cluster.nodes[LIAR].config_path, altered)
        cluster.start(REQUESTER)
        cluster.start(LIAR)
        status = _wait_for(
            cluster,
            REQUESTER,
            lambda s: (
                s.halo is not None
                and s.halo["owners"][ids[LIAR]]["received"]
                and not s.halo["waiting"]
                and s.round >= 1
            ),
            90,
            "the requester to take the liar's readings, give up on the silent owner and train",
        )
        assert status.halo is not None
        liar = status.halo["owners"][ids[LIAR]]
        assert liar["sensors"] == len(from_liar)
        assert liar["mean_mph"] == pytest.approx(expected_mean, abs=1e-3)
        assert abs(liar["mean_mph"] - honest_mean) > 9.0
        silent = status.halo["owners"][ids[SILENT]]
        assert not silent["received"] and silent["sensors"] == len(from_silent)
        assert status.halo["masked_sensors"] == len(from_silent)
        assert status.feature_bytes_received == 4 * len(from_liar) * full.windows.raw.shape[0]
        log = cluster.nodes[REQUESTER].log_path.read_text()
        assert f"starting without features from {ids[SILENT]}" in log
        shown = CliRunner().invoke(
            cli_main, ["status", "--socket", str(cluster.nodes[REQUESTER].socket_path)]
        )
        assert shown.exit_code == 0, shown.output
        flat = " ".join(shown.output.split())
        assert f"{len(from_liar)}/{len(halo)} sensors from their owners" in flat
        assert f"{len(from_silent)} masked (no readings from {ids[SILENT][:8]}" in flat
        liar_status = cluster.status(LIAR)
        assert liar_status is not None and liar_status.halo is not None
        assert liar_status.halo["ignored_sensors"] == len(other_ids)
        assert "readings of sensors owned by other cloudlets ignored" in (
            cluster.nodes[LIAR].log_path.read_text()
        )
        # Live: the replay runs to its end; the liar pushed every step to its subscriber, the
        # requester forecast from them (the silent owner's sensors masked) and scored itself.
        live = _wait_for(
            cluster,
            REQUESTER,
            lambda s: s.live is not None and s.live["finished"],
            60,
            "the requester's replay to finish",
        ).live
        assert live is not None
        assert live["pushes_received"] > 0, (
            live,
            cluster.log_tail(REQUESTER),
            cluster.log_tail(LIAR),
        )
        assert live["halo_age_s"][ids[LIAR]] is not None
        assert live["halo_age_s"][ids[SILENT]] is None
        assert all(live["mae"][h] is not None for h in ("15", "30", "60"))
        assert live["masked_inputs"] >= len(from_silent)
        liar_live = cluster.status(LIAR)
        assert liar_live is not None and liar_live.live is not None
        assert liar_live.live["subscribers"] == 1 and liar_live.live["pushes_sent"] > 0
        socket = str(cluster.nodes[REQUESTER].socket_path)
        status_text = CliRunner().invoke(cli_main, ["status", "--socket", socket])
        flat = " ".join(status_text.output.split())
        assert "(replay finished); rolling MAE 15 min" in flat and "halo inputs masked" in flat
        shown = CliRunner().invoke(cli_main, ["forecast", "--socket", socket, "--json"])
        assert shown.exit_code == 0, shown.output
        reply = json.loads(shown.output)
        own = [full.graph.sensor_ids[i] for i in full.partition.members[REQUESTER]]
        assert sorted(reply["sensors"]) == sorted(own) and reply["masked"]
        assert all(len(v) == 3 and all(np.isfinite(v)) for v in reply["sensors"].values())
        one = CliRunner().invoke(cli_main, ["forecast", "--socket", socket, "--sensor", own[0]])
        assert one.exit_code == 0 and own[0] in one.output and "DEGRADED" in one.output
        wrong = CliRunner().invoke(cli_main, ["forecast", "--socket", socket, "--sensor", "x"])
        assert wrong.exit_code == 1 and "not one of this cloudlet" in wrong.output
        codes = cluster.stop_all(timeout=30)
        assert codes == {REQUESTER: 0, LIAR: 0}
