"""The learning setup's keys reach real daemons and take effect there (the processes engine).

The processes engine writes each ``[[setup]]`` into every daemon's configuration by the setup
description itself (``learning.setup.daemon_tables``); here one small run sets the keys whose
effect a daemon shows in its status: the update norm bound (every peer's model is refused and
counted as ``invalid_update:norm_exceeded``), the task's partition (quantity skew: unequal node
sizes), the learning-rate schedule (the factor of each daemon's last training is the virtual
engine's for as many trainings of the same plan) and the kept optimizer (the Adam moments have
seen every step of the daemon's trainings, not only the last one's), next to a codec and a rule
with its parameter (that the daemons read those back: tests/learning/test_setup_roundtrip.py,
tests/sim/test_codec.py). The virtual engine's effects of every key:
tests/learning/test_every_key.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.learning.setup import schedule_scale, training_progress
from p2pfl.sim.netns import can_create_namespaces
from p2pfl.sim.results import load_results

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]

SCENARIO = """
name = "keys"
seed = 2
[task]
name = "digits"
nodes = 3
partition = "quantity"
alpha = 0.3
[training]
epochs = 0.5
eval_interval = 1.0
lr_schedule = "cosine"
lr_final = 0.0
keep_optimizer = true
[stop]
time = 10.0
rounds = 3
[[setup]]
name = "bounded"
protocol = "server-free"
# Every peer's model is refused (max_norm): each round closes at its timeout.
round_timeout = 0.5
aggregation = "trimmed_mean"
trim_fraction = 0.0
codec = "int8"
max_norm = 1e-6
"""


def test_the_daemons_apply_the_setup_keys(short_tmp: Path) -> None:
    scenario = short_tmp / "keys.toml"
    scenario.write_text(SCENARIO)
    out = short_tmp / "out"
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "simulate", str(scenario), "--engine", "processes",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (setup,) = load_results(out / "results.json").setups
    assert setup.aggregation == "trimmed_mean"
    # partition = "quantity" (the daemons refused it once): node sizes differ, and so do the
    # steps of one half-epoch training (an IID split would give each node the same).
    assert len({node.extra["training"]["last_steps"] for node in setup.nodes}) == 3
    for node in setup.nodes:
        # max_norm: every model from a peer is farther than 1e-6 from this node's own.
        assert node.extra["rejected"].get("invalid_update:norm_exceeded", 0) > 0, node.extra
        assert sum(node.extra["bytes_out_by_peer"].values()) > 0
        training = node.extra["training"]
        done = training["trainings"]
        assert done >= 2, training
        assert training["lr_scale"] == schedule_scale("cosine", 0.0, training_progress(done - 1, 3))
        assert training["optimizer_steps"] == training["session_steps"] > training["last_steps"]
