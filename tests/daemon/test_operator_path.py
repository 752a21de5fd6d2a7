"""The README's two-machine path, followed line by line, ends with two daemons that see each other.

Each "machine" is a network namespace on one bridge (one LAN) with its own working directory,
home and runtime directory (what /run is on a machine of its own). The commands are the
README's own lines: the test checks that each is in README.md as written, then runs it with the
values the earlier commands printed in place of KEY and HEX, and `.venv/bin/p2pfl` as this
interpreter's `python -m p2pfl`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]

README = Path(__file__).resolve().parents[2] / "README.md"
P2PFL = ".venv/bin/p2pfl"

FEDERATION_INIT = f"{P2PFL} federation init --dir federation"
INIT = {
    "site-a": f"{P2PFL} init --config node/p2pfl.toml --state-dir node/state --name site-a "
    "--nodes 2 --node-index 0 --federation-key KEY",
    "site-b": f"{P2PFL} init --config node/p2pfl.toml --state-dir node/state --name site-b "
    "--nodes 2 --node-index 1 --federation-key KEY",
}
ADMIT = f"{P2PFL} federation admit --dir federation --node-key HEX --name site-b --out site-b.cert"
INSTALL = "install -m 0600 site-b.cert node/state/federation.cert"
RUN = f"{P2PFL} run --config node/p2pfl.toml"
PEERS = f"{P2PFL} peers --config node/p2pfl.toml"


@dataclass
class Machine:
    name: str
    index: int
    home: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.home / "daemon.log"


def _argv(line: str) -> list[str]:
    words = shlex.split(line)
    return [sys.executable, "-m", "p2pfl", *words[1:]] if words[0] == P2PFL else words


def _sh(net: BridgedNetwork, machine: Machine, line: str, check: bool = True) -> str:
    done = subprocess.run(
        net.command(machine.index, _argv(line)),
        cwd=machine.home, env=machine.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, f"{machine.name}$ {line}\n{done.stdout}{done.stderr}"
    return done.stdout


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def test_the_readme_two_machine_path_ends_with_two_daemons_that_see_each_other(
    short_tmp: Path,
) -> None:
    readme = README.read_text()
    for line in [FEDERATION_INIT, *INIT.values(), ADMIT, INSTALL, RUN, PEERS]:
        assert line in readme, f"README.md no longer has the line: {line}"
    with BridgedNetwork(2) as net:
        machines = []
        for index, name in enumerate(("site-a", "site-b")):
            home = short_tmp / name
            (home / "home").mkdir(parents=True)
            env = dict(os.environ, HOME=str(home / "home"), RUNTIME_DIRECTORY=str(home / "run"))
            machines.append(Machine(name, index, home, env))
        a, b = machines
        printed = _sh(net, a, FEDERATION_INIT)
        (key,) = [x.split()[1] for x in printed.splitlines() if x.startswith("federation_public")]
        admit_lines = {}
        for machine in machines:
            out = _sh(net, machine, INIT[machine.name].replace("KEY", key))
            (line,) = [x.strip() for x in out.splitlines() if "federation admit" in x]
            admit_lines[machine.name] = line
        # The operator (A) runs each printed line as the README says, and sends B its certificate.
        for name, line in admit_lines.items():
            node_key = shlex.split(line)[shlex.split(line).index("--node-key") + 1]
            expected = ADMIT.replace("HEX", node_key).replace("site-b", name)
            assert line.replace("--dir FEDERATION_DIR", "--dir federation") == expected.replace(
                P2PFL, "p2pfl"
            )
            _sh(net, a, expected)
        shutil.copy(a.home / "site-b.cert", b.home / "site-b.cert")
        for machine in machines:
            _sh(net, machine, INSTALL.replace("site-b", machine.name))
        try:
            for machine in machines:
                with machine.log.open("wb") as log:
                    machine.process = subprocess.Popen(
                        net.command(machine.index, _argv(RUN)),
                        cwd=machine.home, env=machine.env, stdout=log, stderr=subprocess.STDOUT,
                    )  # fmt: skip
            ids = {}
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and len(ids) < 2:
                for machine in machines:
                    assert machine.process is not None
                    if machine.process.poll() is not None:
                        pytest.fail(f"{machine.name} exited:\n{_tail(machine.log)}")
                    peers: list[dict[str, Any]] = []
                    out = _sh(net, machine, PEERS.replace("peers", "peers --json"), check=False)
                    if out.strip():
                        peers = json.loads(out)
                    connected = [p for p in peers if p["state"] == "connected"]
                    if len(connected) == 1:
                        ids[machine.name] = connected[0]["name"]
                time.sleep(0.5)
            if ids != {"site-a": "site-b", "site-b": "site-a"}:
                logs = "\n".join(f"--- {m.name}\n{_tail(m.log)}" for m in machines)
                pytest.fail(f"the daemons did not see each other: {ids}\n{logs}")
            # The README's own line, as a person reads it.
            for machine, other in ((a, b), (b, a)):
                table = _sh(net, machine, PEERS)
                assert other.name in table and "connected" in table and "host" in table
        finally:
            for machine in machines:
                if machine.process is not None and machine.process.poll() is None:
                    machine.process.terminate()
            codes = [m.process.wait(timeout=60) if m.process else None for m in machines]
        assert codes == [0, 0], "\n".join(_tail(m.log) for m in machines)
