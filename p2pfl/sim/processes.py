"""The multi-process engine: N real `p2pfl run` daemons on this machine, in a private network.

Each daemon gets its own key, a membership certificate of a federation made for the run, its own
state and runtime directories and its own configuration file, and runs as a child process inside
the private test network of :mod:`p2pfl.sim.netns` (a namespace per node on one bridge,
addresses 10.77.0.2 and up), so discovery is real mDNS, connections are real WebRTC, every
message is really signed, and nothing can leave the machine. The harness watches the daemons
only through their control sockets, exactly as an operator's `p2pfl status` would.

:class:`DaemonCluster` is the building block (the tests drive it directly: start, SIGKILL,
restart); :func:`run_processes` runs a scenario with it for `p2pfl simulate --engine processes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from p2pfl.daemon.control import ControlError, NodeStatus, fetch_status
from p2pfl.files import atomic_write
from p2pfl.identity import NodeIdentity
from p2pfl.sim.netns import BridgedNetwork
from p2pfl.trust import CERTIFICATE_FILE, FederationAuthority

__all__ = ["ClusterSpec", "DaemonCluster", "DaemonNode"]


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """What every daemon of the cluster runs (the per-node parts are filled in by the cluster)."""

    n_nodes: int
    task: str = "digits"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    epochs: float = 1.0
    protocol: str = "gossip"
    aggregation: str = "mean"
    codec: str = "fp32"
    params: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    mdns: bool = True
    static_peers: bool = False
    """Also give every node the others' signaling addresses (fixed ports) as static peers."""
    peer_timeout_s: float = 6.0
    checkpoint_interval_s: float = 5.0
    log_level: str = "info"
    threads: int = 1


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml(tables: Mapping[str, Mapping[str, object]]) -> str:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass
class DaemonNode:
    index: int
    name: str
    address: str
    root: Path
    identity: NodeIdentity
    signaling_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def config_path(self) -> Path:
        return self.root / "p2pfl.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class DaemonCluster:
    """N daemons with keys, a federation and configurations under ``root``.

    ``network`` is a :class:`p2pfl.sim.netns.BridgedNetwork` (one namespace per node: every node
    has its own address, as on a LAN) or a ``SharedNetwork`` (loopback aliases in one namespace),
    with at least N nodes.
    """

    def __init__(self, root: Path, spec: ClusterSpec, network: Any) -> None:
        self.root = root
        self.spec = spec
        self.network = network
        addresses = network.addresses if network is not None else []
        if len(addresses) < spec.n_nodes:
            raise ValueError(f"the network has {len(addresses)} addresses, {spec.n_nodes} needed")
        self.federation = FederationAuthority.generate()
        self.nodes: list[DaemonNode] = []
        now = time.time()
        for index in range(spec.n_nodes):
            node_root = root / f"node{index}"
            identity = NodeIdentity.generate()
            node = DaemonNode(
                index=index,
                name=f"node-{index}",
                address=addresses[index],
                root=node_root,
                identity=identity,
                signaling_port=7070 if spec.static_peers else 0,
            )
            node_root.mkdir(parents=True, exist_ok=True)
            identity.save(node.state_dir)
            certificate = self.federation.admit(
                identity.public_key, name=node.name, expires_at=now + 7 * 86400, issued_at=now
            )
            atomic_write(node.state_dir / CERTIFICATE_FILE, certificate, mode=0o600)
            self.nodes.append(node)
        for node in self.nodes:
            node.config_path.write_text(self._config(node))

    def _config(self, node: DaemonNode) -> str:
        spec = self.spec
        static = [
            f"{other.address}:{other.signaling_port}"
            for other in self.nodes
            if other is not node and spec.static_peers
        ]
        tables: dict[str, dict[str, object]] = {
            "node": {
                "name": node.name,
                "state_dir": str(node.state_dir),
                "runtime_dir": str(node.runtime_dir),
            },
            "trust": {
                "mode": "federation",
                "federation_public_key": self.federation.public_key.hex(),
            },
            "discovery": {
                "mdns": spec.mdns,
                "listen_host": node.address,
                "signaling_port": node.signaling_port,
                "static_peers": static,
            },
            "protocol": {
                "name": spec.protocol,
                "aggregation": spec.aggregation,
                "codec": spec.codec,
                "seed": spec.seed,
            },
            "protocol.params": dict(spec.params),
            "task": {
                "name": spec.task,
                "partition": spec.partition,
                "alpha": spec.alpha,
                "node_index": node.index,
                "n_nodes": spec.n_nodes,
                "seed": spec.seed,
                "epochs": spec.epochs,
            },
            "executor": {"threads": spec.threads},
            "limits": {"peer_timeout_s": spec.peer_timeout_s},
            "logging": {"level": spec.log_level},
            "checkpoints": {"interval_s": spec.checkpoint_interval_s},
        }
        return _toml(tables)

    # ---- processes ---------------------------------------------------------------------------

    def start(self, index: int) -> DaemonNode:
        node = self.nodes[index]
        if node.running:
            raise RuntimeError(f"{node.name} is already running")
        argv = [sys.executable, "-m", "p2pfl", "run", "--config", str(node.config_path)]
        if isinstance(self.network, BridgedNetwork):
            argv = self.network.command(index, argv)
        elif self.network is not None:
            argv = self.network.command(argv)
        node.log_file = open(node.log_path, "ab")  # noqa: SIM115 (closed in _reap)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        node.process = subprocess.Popen(
            argv, stdout=node.log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        return node

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node.index)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[index]
        if node.process is not None and node.process.poll() is None:
            # `ip netns exec` execs the daemon, so the pid is the daemon's own.
            node.process.send_signal(sig)

    def wait(self, index: int, timeout: float) -> int | None:
        node = self.nodes[index]
        if node.process is None:
            return None
        try:
            code = node.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reap(node)
        node.process = None
        return code

    def _reap(self, node: DaemonNode) -> None:
        if node.log_file is not None:
            node.log_file.close()
            node.log_file = None

    def stop_all(self, timeout: float = 30.0) -> dict[int, int | None]:
        """SIGTERM every daemon; SIGKILL those still running after ``timeout``; exit codes."""
        for node in self.nodes:
            self.kill(node.index, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[int, int | None] = {}
        for node in self.nodes:
            if node.process is None:
                continue
            codes[node.index] = self.wait(node.index, max(0.1, deadline - time.monotonic()))
            if codes[node.index] is None:
                self.kill(node.index, signal.SIGKILL)
                self.wait(node.index, 5)
        return codes

    def close(self) -> None:
        for node in self.nodes:
            if node.running:
                self.kill(node.index, signal.SIGKILL)
                self.wait(node.index, 5)
            self._reap(node)

    def __enter__(self) -> DaemonCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- observation -------------------------------------------------------------------------

    def status(self, index: int, *, timeout: float = 5.0) -> NodeStatus | None:
        """The node's status, or None while its control socket does not answer."""
        node = self.nodes[index]
        with contextlib.suppress(ControlError):
            return fetch_status(node.socket_path, timeout=timeout)
        return None

    def log_tail(self, index: int, lines: int = 20) -> str:
        path = self.nodes[index].log_path
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
