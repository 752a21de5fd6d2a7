"""One real daemon under a stand-in for systemd: sd_notify, metrics, SIGHUP and SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from p2pfl.daemon.checkpoint import CheckpointStore
from p2pfl.daemon.control import ControlError, fetch_status


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp: Path, level: str, port: int) -> str:
    return f"""
[node]
name = "solo"
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"
[trust]
mode = "open"
[discovery]
mdns = false
listen_host = "127.0.0.1"
[protocol.params]
period = 0.5
[task]
n_nodes = 2
epochs = 0.5
[logging]
level = "{level}"
[metrics]
prometheus = true
port = {port}
[checkpoints]
interval_s = 600.0
"""


@pytest.mark.slow
def test_daemon_talks_to_systemd_serves_metrics_reloads_and_stops_cleanly(
    short_tmp: Path,
) -> None:
    port = _free_port()
    config = short_tmp / "p2pfl.toml"
    config.write_text(_config(short_tmp, "info", port))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_tmp / "notify"))
    notify.settimeout(120)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(short_tmp / "notify"),
        "WATCHDOG_USEC": "2000000",
    }
    log = (short_tmp / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "p2pfl", "run", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        messages = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(notify.recv(4096).decode())
        assert messages[-1].startswith("READY=1\nSTATUS=round ")
        # The control socket is up by READY, and training goes on.
        status = fetch_status(short_tmp / "run" / "control.sock")
        assert status.name == "solo" and status.trust_mode == "open"
        deadline = time.monotonic() + 60
        while fetch_status(short_tmp / "run" / "control.sock").round < 3:
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.5)
        # Watchdog pings at half of WATCHDOG_USEC (1 s), STATUS follows the rounds.
        seen = [notify.recv(4096).decode() for _ in range(6)]
        assert "WATCHDOG=1" in seen
        assert any(m.startswith("STATUS=round ") for m in seen)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        metrics = body.decode()
        assert "p2pfl_training_steps_total" in metrics and "p2pfl_round " in metrics
        assert 'p2pfl_model_metric{name="accuracy"}' in metrics
        # SIGHUP: a new log level applies without a restart.
        config.write_text(_config(short_tmp, "debug", port))
        daemon.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        reloaded = b'msg="configuration reloaded" log_level=debug'
        while reloaded not in (short_tmp / "daemon.log").read_bytes():
            assert time.monotonic() < deadline, (short_tmp / "daemon.log").read_text()[-3000:]
            time.sleep(0.2)
        # SIGTERM: STOPPING, a final checkpoint, exit 0 well inside stop_timeout_s (20 s).
        round_before = fetch_status(short_tmp / "run" / "control.sock").round
        stopped_at = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        took = time.monotonic() - stopped_at
        assert took < 20, f"stopping took {took:.1f} s"
        rest = []
        notify.settimeout(0.5)
        while True:
            try:
                rest.append(notify.recv(4096).decode())
            except TimeoutError:
                break
        assert any(m.startswith("STOPPING=1") for m in rest)
        latest, _ = CheckpointStore(short_tmp / "state" / "checkpoints").load_latest()
        assert latest is not None and latest.state["round"] >= round_before
        with pytest.raises(ControlError, match="not running"):
            fetch_status(short_tmp / "run" / "control.sock")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
        notify.close()


@pytest.mark.slow
def test_p2pfl_stop_ends_a_real_daemon_like_sigterm_with_a_final_checkpoint(
    short_tmp: Path,
) -> None:
    config = short_tmp / "p2pfl.toml"
    config.write_text(_config(short_tmp, "info", _free_port()))
    sock = short_tmp / "run" / "control.sock"
    log = (short_tmp / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "p2pfl", "run", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert daemon.poll() is None, (short_tmp / "daemon.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the daemon trained no round"
            try:
                if fetch_status(sock).round >= 1:
                    break
            except ControlError:
                pass
            time.sleep(0.5)
        stop = subprocess.run(
            [sys.executable, "-m", "p2pfl", "stop", "--config", str(config)],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.decode().endswith("has stopped\n")
        assert daemon.wait(10) == 0  # gone by the time `stop` returned
        text = (short_tmp / "daemon.log").read_text()
        assert 'msg="stop requested over the control socket"' in text
        assert 'msg="checkpoint written"' in text and "msg=stopped" in text
        latest, _ = CheckpointStore(short_tmp / "state" / "checkpoints").load_latest()
        assert latest is not None and latest.state["round"] >= 1
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
