"""Stopping a processes-engine run early leaves nothing behind and ends quietly.

The harness runs as `make demo` runs it: ``python -m p2pfl.sim.netns -- python -m p2pfl
simulate ... --engine processes``, on a terminal (a pseudo-terminal here). Once its daemons
answer on their control sockets it gets SIGINT or SIGTERM (as from `kill`, to the wrapper), or a
Ctrl-C typed at the terminal (SIGINT to the whole foreground process group), or its terminal
closes (SIGHUP from the kernel, to the same group). Afterwards no namespace of the run, no
temporary folder and no daemon may remain, the exit status is 130, 143 or 129, and no traceback
was printed.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from p2pfl.daemon.control import ControlError, fetch_status
from p2pfl.sim.netns import can_create_namespaces

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]

SCENARIO = """
name = "interrupted"
seed = 1
[task]
name = "digits-logreg"
nodes = 2
[training]
eval_interval = 1.0
[stop]
time = 300.0
[[setup]]
name = "gossip"
protocol = "gossip"
period = 1.0
"""


class _Terminal:
    """A command on a pseudo-terminal of its own (it is the foreground process group there)."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a session leader with the terminal as its own
            os.execv(argv[0], argv)
        # Wide, so that no printed path is wrapped.
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        self.output = b""
        self.status: int | None = None

    def read(self, seconds: float) -> bool:
        """Collect output for ``seconds``; False once the terminal is closed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: every process on the terminal has exited
                return False
            if not data:
                return False
            self.output += data
        return True

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.read(0.2):
                time.sleep(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.read(0.2)
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s:\n{self.text[-2000:]}")

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize(
    ("how", "expected"),
    [("SIGINT", 130), ("SIGTERM", 143), ("Ctrl-C at the terminal", 130), ("terminal closed", 129)],
)
def test_stopping_the_harness_removes_namespaces_folder_and_daemons(
    tmp_path: Path, how: str, expected: int
) -> None:
    scenario = tmp_path / "interrupted.toml"
    scenario.write_text(SCENARIO)
    harness = _Terminal(
        [sys.executable, "-m", "p2pfl.sim.netns", "--", sys.executable, "-m", "p2pfl",
         "simulate", str(scenario), "--engine", "processes", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    try:
        sockets: list[Path] = []
        deadline = time.monotonic() + 240
        while len(sockets) < 2:
            assert harness.read(0.5), harness.text
            assert time.monotonic() < deadline, harness.text
            sockets = [Path(s) for s in re.findall(r"--socket\s+(\S+\.sock)", harness.text)]
        root = sockets[0].parents[2]
        assert root.name.startswith("p2pfl-sim-") and root.is_dir()
        (simulate,) = _children(harness.pid)
        ours = {n for n in _namespaces() if n.startswith(f"p2pfl-{simulate}-")}
        assert len(ours) == 3  # the hub and one per node
        up: set[Path] = set()
        while up != set(sockets):  # the daemons are up: they answer on their control sockets
            assert harness.read(0.5), harness.text
            assert time.monotonic() < deadline, harness.text
            for path in set(sockets) - up:
                try:
                    fetch_status(path, timeout=2.0)
                    up.add(path)
                except ControlError:
                    pass
        assert len(_processes_mentioning(str(root))) >= 2

        if how == "Ctrl-C at the terminal":
            os.write(harness.fd, b"\x03")
        elif how == "terminal closed":  # the kernel sends SIGHUP to the foreground group
            os.close(harness.fd)
            harness.fd = os.open(os.devnull, os.O_RDONLY)  # nothing more to read
        else:
            os.kill(harness.pid, getattr(signal, how))
        code = harness.wait(timeout=60)
    finally:
        if harness.status is None:  # a failed assertion: do not leave the harness running
            os.kill(harness.pid, signal.SIGTERM)
            harness.wait(timeout=60)
        os.close(harness.fd)

    assert code == expected, harness.text
    assert "Traceback" not in harness.text
    if how != "terminal closed":
        assert "p2pfl: interrupted" in harness.text
    assert not root.exists()
    assert not {n for n in _namespaces() if n.startswith(f"p2pfl-{simulate}-")}
    assert _processes_mentioning(str(root)) == []


def test_a_failed_run_removes_its_folder_namespaces_and_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pfl.sim import processes
    from p2pfl.sim.scenario import load_scenario

    scenario = tmp_path / "failing.toml"
    scenario.write_text(SCENARIO)
    roots: list[Path] = []
    namespaces: set[str] = set()
    pids: list[int] = []

    def fail_once_started(cluster: processes.DaemonCluster, name: str, report: object) -> None:
        roots.append(cluster.root)
        namespaces.update(cluster.network.namespaces)
        pids.extend(node.process.pid for node in cluster.nodes if node.process is not None)
        raise processes.ProcessesEngineError("node-0 exited with status 2 while starting")

    monkeypatch.setattr(processes, "_wait_ready", fail_once_started)
    with pytest.raises(processes.ProcessesEngineError):
        processes.run(load_scenario(scenario))
    (root,) = roots
    assert root.name.startswith("p2pfl-sim-") and not root.exists()
    assert len(namespaces) == 3 and namespaces.isdisjoint(_namespaces())
    assert len(pids) == 2 and not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
