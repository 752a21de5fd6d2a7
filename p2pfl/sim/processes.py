"""The multi-process engine: N real `p2pfl run` daemons on this machine, in a private network.

Each daemon gets its own key, a membership certificate of a federation made for the run, its own
state and runtime directories and its own configuration file, and runs as a child process inside
the private test network of :mod:`p2pfl.sim.netns` (a namespace per node on one bridge,
addresses 10.77.0.2 and up), so discovery is real mDNS, connections are real WebRTC, every
message is really signed, and nothing can leave the machine. The harness watches the daemons
only through their control sockets, exactly as an operator's `p2pfl status` would. The daemons
are forked from one fork server (:mod:`p2pfl.sim.forkserver`) that imported torch, aiortc and
the daemon once, so N daemons do not pay N cold starts and share those pages copy-on-write.

:class:`DaemonCluster` is the building block (the tests drive it directly: start, SIGKILL,
restart); :func:`run_processes` runs a scenario with it for `p2pfl simulate --engine processes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from p2pfl.daemon.control import ControlError, NodeStatus, fetch_status
from p2pfl.files import atomic_write
from p2pfl.identity import NodeIdentity
from p2pfl.learning.neighbours import task_positions, task_range_km
from p2pfl.learning.setup import (
    LearningSetup,
    daemon_tables,
    parse_setup,
    setup_values,
    training_progress,
)
from p2pfl.sim.attacks import attackers, describe
from p2pfl.sim.forkserver import ForkedProcess, ForkServer
from p2pfl.sim.netns import BridgedNetwork
from p2pfl.sim.network import build_topology
from p2pfl.sim.results import NodeResult, Results, SetupResult
from p2pfl.sim.scenario import (
    NetworkSpec,
    PartitionSpec,
    Scenario,
    SetupSpec,
    StopSpec,
    TrainingSpec,
    scenario_error,
    task_errors,
)
from p2pfl.trust import CERTIFICATE_FILE, FederationAuthority

__all__ = ["ClusterSpec", "DaemonCluster", "DaemonNode", "ProcessesEngineError", "run"]


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """What every daemon of the cluster runs (the per-node parts are filled in by the cluster)."""

    n_nodes: int
    task: str = "digits"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    epochs: float = 1.0
    lr: float | None = None
    batch_size: int | None = None
    task_options: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    exchange_features: bool = False
    """Graph tasks: give every daemon all node ids so halo features travel between them."""
    replay_speed: float = 0.0
    """Graph tasks: every daemon's ``[data] replay_speed`` (live replay and forecasts; 0: off)."""
    protocol: str = "gossip"
    aggregation: str | None = "mean"  # None: the protocol's robust default
    codec: str = "fp32"
    params: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    setup: LearningSetup | None = None
    """The learning setup every daemon runs (a scenario's ``SetupSpec.learning``); None: the one
    that ``protocol``, ``aggregation``, ``codec``, ``params`` and ``epochs`` describe."""
    mdns: bool = True
    static_peers: bool = False
    """Also give every node the others' signaling addresses (fixed ports) as static peers."""
    peer_timeout_s: float = 6.0
    checkpoint_interval_s: float = 5.0
    log_level: str = "info"
    threads: int = 1
    executor_mode: str = "thread"
    """Thread mode by default here: many daemons share this machine's memory and cores."""
    start_peers: int = 0
    """Daemons start learning once this many peers are up (or after ``start_timeout_s``); the
    scenario runner sets n - 1 for every protocol."""
    start_timeout_s: float = 20.0
    aggregator_index: int | None = None
    """FedAvg: the node (by index) every daemon is configured to follow; None: the smallest live
    node id, chosen by the protocol itself."""
    neighbours: str = "all"
    """Server-free: "all", "topology" (each daemon gets its ``links`` as neighbour_ids) or
    "range" (each daemon gets its position, every other member's and ``range_km``)."""
    range_km: float | None = None
    positions: tuple[tuple[float, float], ...] = ()
    """(lat, lon) of each node by index, for neighbours = "range"."""
    links: tuple[tuple[int, ...], ...] = ()
    """Each node's links by index, for neighbours = "topology"."""
    attackers: Mapping[int, Any] = field(default_factory=dict)
    """[[attack]]: node index -> ``learning.attacks.Attack``; those nodes run the test-only
    attacking build of the daemon (``p2pfl.sim.attacker``) instead of ``p2pfl run``, except
    kind = "absent": those daemons are never started (nor listed as anyone's static peer)."""

    @property
    def absent(self) -> frozenset[int]:
        return frozenset(i for i, a in self.attackers.items() if a.kind == "absent")

    def learning(self) -> LearningSetup:
        """The setup written into every daemon's configuration (see ``setup``)."""
        if self.setup is not None:
            return self.setup
        return parse_setup(
            {
                "protocol": self.protocol,
                **({"aggregation": self.aggregation} if self.aggregation is not None else {}),
                "codec": self.codec,
                "epochs": float(self.epochs),
                **({"neighbours": self.neighbours} if self.neighbours != "all" else {}),
                **self.params,
            }
        )


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
    process: subprocess.Popen[bytes] | ForkedProcess | None = None
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

    ``launcher`` says how a daemon process starts: ``"fork"`` (the default) forks it from a
    :class:`p2pfl.sim.forkserver.ForkServer` that has imported everything once, so N daemons do
    not pay N cold starts; ``"exec"`` runs ``python -m p2pfl run`` under ``ip netns exec``, as an
    operator or systemd starts one. ``fork_server``: one started already (the caller closes it);
    by default the cluster starts its own at the first start() and closes it. Either way each
    daemon is its own process in its node's namespace, with its own configuration, keys, sockets
    and log.
    """

    def __init__(
        self,
        root: Path,
        spec: ClusterSpec,
        network: Any,
        *,
        launcher: str = "fork",
        fork_server: ForkServer | None = None,
    ) -> None:
        if launcher not in ("fork", "exec"):
            raise ValueError(f'launcher must be "fork" or "exec", not {launcher!r}')
        self.root = root
        self.spec = spec
        self.network = network
        self.launcher = launcher
        self._own_fork_server = fork_server is None
        self._fork_server = fork_server
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
        setup = daemon_tables(self._setup())
        static = [
            f"{other.address}:{other.signaling_port}"
            for other in self.nodes
            if other is not node and spec.static_peers and other.index not in spec.absent
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
                **setup["protocol"],
                "seed": spec.seed,
                "start_peers": spec.start_peers,
                "start_timeout_s": spec.start_timeout_s,
            },
            "protocol.params": setup["protocol.params"],
            "task": {
                **setup["task"],
                "name": spec.task,
                "partition": spec.partition,
                "alpha": spec.alpha,
                "node_index": node.index,
                "n_nodes": spec.n_nodes,
                "seed": spec.seed,
                "node_ids": [n.identity.node_id for n in self.nodes]
                if spec.exchange_features
                else [],
                **({"lr": spec.lr} if spec.lr is not None else {}),
                **({"batch_size": spec.batch_size} if spec.batch_size is not None else {}),
            },
            "task.options": dict(spec.task_options),
            **({"data": {"replay_speed": spec.replay_speed}} if spec.replay_speed > 0 else {}),
            "executor": {"threads": spec.threads, "mode": spec.executor_mode},
            "limits": {"peer_timeout_s": spec.peer_timeout_s, **setup.get("limits", {})},
            "logging": {"level": spec.log_level},
            "checkpoints": {"interval_s": spec.checkpoint_interval_s},
        }
        self._add_neighbours(node, tables)
        return _toml(tables)

    def _add_neighbours(self, node: DaemonNode, tables: dict[str, dict[str, object]]) -> None:
        """The setup's neighbours as this daemon's [node]/[protocol] keys (see ClusterSpec)."""
        spec = self.spec
        if spec.neighbours == "all":
            return
        ids = [n.identity.node_id for n in self.nodes]
        if spec.neighbours == "topology":
            tables["protocol"]["neighbour_ids"] = [ids[j] for j in spec.links[node.index]]
            return
        tables["node"]["position"] = list(spec.positions[node.index])
        tables["protocol.positions"] = {
            ids[i]: list(p) for i, p in enumerate(spec.positions) if i != node.index
        }

    def _setup(self) -> LearningSetup:
        """The cluster's setup with what only the cluster knows: FedAvg's aggregator as that
        daemon's node id, and the range the scenario's task gives (``ClusterSpec.range_km``)."""
        values = setup_values(self.spec.learning())
        if self.spec.aggregator_index is not None:
            values["aggregator"] = self.nodes[self.spec.aggregator_index].identity.node_id
        else:
            values.pop("aggregator", None)
        if values.get("neighbours") == "range":
            values["range_km"] = self.spec.range_km
        return parse_setup(values)

    # ---- processes ---------------------------------------------------------------------------

    def start(self, index: int) -> DaemonNode:
        node = self.nodes[index]
        if node.running:
            raise RuntimeError(f"{node.name} is already running")
        # An attacking build (test-only, [[attack]]) starts cold: the fork server runs only
        # what `p2pfl run` runs.
        if self.launcher == "fork" and index not in self.spec.attackers:
            if self._fork_server is None:
                self._fork_server = ForkServer(self.root, self.root / "forkserver.log")
            node.process = self._fork_server.spawn(
                ["run", "--config", str(node.config_path)],
                log=node.log_path,
                netns=self._namespace_path(index),
                name=node.name,
            )
            return node
        argv = [sys.executable, "-m", "p2pfl", "run", "--config", str(node.config_path)]
        if index in self.spec.attackers:  # [[attack]] (sim.attacks): the attacking build
            argv[2:4] = ["p2pfl.sim.attacker", *self._attack_args(index)]
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

    def _namespace_path(self, index: int) -> str | None:
        if isinstance(self.network, BridgedNetwork):
            return f"/run/netns/{self.network.nodes[index].namespace}"
        name = getattr(self.network, "name", None)  # a SharedNetwork: one namespace for all
        return f"/run/netns/{name}" if isinstance(name, str) and name else None

    def _attack_args(self, index: int) -> list[str]:
        colluders = [self.nodes[i].identity.node_id for i in self.spec.attackers if i != index]
        attack = dataclasses.asdict(self.spec.attackers[index])
        return [json.dumps(attack), json.dumps(colluders)]

    def start_all(self) -> None:
        for node in self.nodes:
            if node.index not in self.spec.absent:
                self.start(node.index)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[index]
        if node.process is not None and node.process.poll() is None:
            # `ip netns exec` execs the daemon, and a forked one is the daemon: the daemon's pid.
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
        if self._fork_server is not None and self._own_fork_server:
            self._fork_server.close()
            self._fork_server = None

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


# ---- `p2pfl simulate --engine processes` ------------------------------------------------------

Progress = Callable[[str, float, str], None]
_READY_TIMEOUT_S = 180.0
_STOP_TIMEOUT_S = 40.0


class ProcessesEngineError(click.ClickException):
    """The engine cannot run here; the message says why and what to do."""


def run(scenario: Scenario, *, progress: Progress | None = None) -> Results:
    """Run every setup of ``scenario`` with real daemons; the same Results as the virtual engine.

    Time is wall-clock: ``stop.time`` counts from the moment every daemon answers on its control
    socket. Churn is real: a leaving daemon gets SIGTERM or SIGKILL (by turns) and is restarted
    after ``churn.downtime``, resuming from its checkpoint; partitions cut the links between
    groups (:meth:`BridgedNetwork.cut`); both are listed in ``extra.applied``. Per-link latency
    and loss become ``tc netem`` where the kernel has it; what is not applied (bandwidth limits,
    netem on a kernel without it, what only the virtual engine models: :func:`virtual_only`) is
    listed in ``extra.not_applied``.
    """
    from p2pfl.sim.netns import can_create_namespaces, sweep_stale_namespaces

    refuse_unapplied_training(scenario)
    if not can_create_namespaces():
        raise ProcessesEngineError(
            "the processes engine runs its daemons in private network namespaces, which this "
            "process may not create: run as root, or as "
            "`python -m p2pfl.sim.netns -- p2pfl simulate SCENARIO --engine processes`"
        )
    sweep_stale_namespaces()
    # The harness needs the task only to name the metric (and for node positions): it loads in
    # a thread of its own while the first setup's fork server, network and daemons start.
    loading = _Loading(_load_task, scenario)
    needs_task = any(setup.neighbours == "range" for setup in scenario.setups)
    setups = [
        _run_setup(scenario, setup, progress, loading.result() if needs_task else None)
        for setup in scenario.setups
    ]
    task = loading.result()
    return Results(
        scenario=scenario.name,
        engine="processes",
        seed=scenario.seed,
        task=scenario.task.name,
        primary_metric=task.primary_metric,
        higher_is_better=task.higher_is_better,
        setups=setups,
        scenario_source=dict(scenario.raw),
    )


def virtual_only(scenario: Scenario, setup: SetupSpec) -> list[str]:
    """The scenario's keys, set away from their defaults, that only the virtual engine models:
    its compute speed, evaluation sample, numpy training path, detection delay and a
    topology's links for every protocol. Real daemons train on their real data in real time,
    score every node, notice a departure by their own timeouts and, but for server-free's
    ``neighbours = "topology"``, connect to every member: the keys are listed in
    ``extra.not_applied`` (and said on screen), not dropped in silence."""
    training, network = TrainingSpec(), NetworkSpec()
    keys = [
        f"training.{name}"
        for name in ("samples_per_s", "speed_spread", "eval_nodes", "path")
        if getattr(scenario.training, name) != getattr(training, name)
    ]
    if scenario.network.detect_s != network.detect_s:
        keys.append("network.detect_s")
    if scenario.network.topology != network.topology and setup.neighbours != "topology":
        keys.append('network.topology (a full mesh: only neighbours = "topology" follows it)')
    return keys


def refuse_unapplied_training(scenario: Scenario) -> None:
    """Refuse what the daemons cannot apply as the virtual engine does: a learning-rate schedule
    of a setup without stop.rounds (the virtual engine then follows stop.time; a daemon plans
    its schedule over its max_rounds, which a scenario sets from stop.rounds)."""
    for index, setup in enumerate(scenario.setups):
        learning = setup.learning
        if learning is None or learning.lr_schedule == "constant":
            continue  # the centralized baseline runs in this process and applies both
        if learning.max_rounds is None:
            from_training = scenario.training.lr_schedule == learning.lr_schedule
            raise scenario_error(
                scenario.source,
                scenario.text,
                "training.lr_schedule" if from_training else f"setup[{index}].lr_schedule",
                f"setup {setup.name!r} has no stop.rounds: the daemons run the schedule over "
                "their planned trainings (max_rounds, from stop.rounds), the virtual engine "
                "over stop.time; set stop.rounds to run it with --engine processes",
            )


class _Loading:
    """``function(*args)`` run in a daemon thread; ``result()`` waits and returns or raises."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function, args), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = function(*args)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _load_task(scenario: Scenario) -> Any:
    from p2pfl.learning.ops import load_scenario_task

    with task_errors(scenario):
        return load_scenario_task(scenario)


def _cluster_spec(scenario: Scenario, setup: SetupSpec, task: Any = None) -> ClusterSpec:
    """The daemons' configuration for ``setup``: the same setup description the virtual engine
    hands the factory (``scenario.learner_setup``), which each daemon reads back from its
    configuration (``daemon.node.learner_setup``), and the same neighbour sets
    (``learning.neighbours``); ``task`` gives node positions for neighbours = "range"."""
    learner = setup.learning
    assert learner is not None  # centralized runs in this process
    n = scenario.task.nodes
    positions: tuple[tuple[float, float], ...] = ()
    range_km = setup.range_km
    links: tuple[tuple[int, ...], ...] = ()
    if setup.neighbours == "range":
        places = task_positions(task)
        if places is None or len(places) != n:
            raise ProcessesEngineError(
                f'setup {setup.name!r}: neighbours = "range" needs node positions; the task '
                f"{scenario.task.name!r} has none (graph tasks: one per cloudlet)"
            )
        positions = places
        range_km = range_km if range_km is not None else task_range_km(task)
    elif setup.neighbours == "topology":
        topology = build_topology(
            n,
            scenario.network.topology,
            scenario.network.degree,
            random.Random(f"{scenario.seed}:topology"),
        )
        links = tuple(tuple(t) for t in topology)
    chosen = attackers(scenario, setup)
    absent = sum(attack.kind == "absent" for attack in chosen.values())
    return ClusterSpec(
        n_nodes=scenario.task.nodes,
        task=scenario.task.name,
        partition=scenario.task.partition,
        alpha=scenario.task.alpha,
        seed=scenario.seed,
        lr=scenario.task.lr,
        batch_size=scenario.task.batch_size,
        task_options=dict(scenario.task.options),
        exchange_features=scenario.task.name.startswith("traffic-"),
        setup=learner,
        replay_speed=scenario.live.replay_speed,
        # Churn restarts daemons from their checkpoints: keep those recent.
        checkpoint_interval_s=5.0 if scenario.churn.fraction > 0 else 30.0,
        aggregator_index=_aggregator_index(setup, scenario.task.nodes),
        # Every protocol starts once all its peers are up, as in the virtual engine (which hands
        # each node every link's PeerUp before Start): FedAvg elects among all of them, and a
        # server-free daemon that started alone would close rounds alone and run ahead. Absent
        # nodes ([[attack]] kind = "absent") are never started: nobody waits for them.
        start_peers=scenario.task.nodes - 1 - absent,
        neighbours=learner.neighbours,
        range_km=range_km,
        positions=positions,
        links=links,
        attackers=chosen,
    )


def _aggregator_index(setup: SetupSpec, n_nodes: int) -> int | None:
    """``setup.aggregator`` as a node index: the virtual engine's id ("n001") or "node-1"."""
    if setup.protocol != "fedavg" or setup.aggregator is None:
        return None
    from p2pfl.sim.scenario import node_ids

    names = {name: i for i, name in enumerate(node_ids(n_nodes))}
    names.update({f"node-{i}": i for i in range(n_nodes)})
    if setup.aggregator not in names:
        raise ProcessesEngineError(
            f"setup {setup.name!r}: aggregator = {setup.aggregator!r} names no node; use one of "
            f"{node_ids(n_nodes)[0]}..{node_ids(n_nodes)[-1]} (or node-0..node-{n_nodes - 1})"
        )
    return names[setup.aggregator]


@dataclass(frozen=True, slots=True)
class _Change:
    """One scheduled change to the running cluster (the virtual engine's churn and partitions)."""

    at: float
    kind: str  # "leave", "join", "cut", "heal"
    node: int = -1
    partition: PartitionSpec | None = None


def churn_schedule(scenario: Scenario) -> list[_Change]:
    """Churn and partitions as timed changes: the same draw as the virtual engine's.

    The nodes that leave, and when, come from ``random.Random(f"{seed}:churn")`` exactly as in
    ``p2pfl.sim.virtual``; a node rejoins ``churn.downtime`` seconds after it left. Every
    partition is a cut at its start and a heal at its end.
    """
    n = scenario.task.nodes
    changes: list[_Change] = []
    churn = scenario.churn
    if churn.fraction > 0:
        rng = random.Random(f"{scenario.seed}:churn")
        for i in sorted(rng.sample(range(n), round(churn.fraction * n))):
            leave = rng.uniform(churn.start, churn.end)
            changes += [_Change(leave, "leave", i), _Change(leave + churn.downtime, "join", i)]
    for p in scenario.network.partitions:
        changes += [_Change(p.start, "cut", partition=p), _Change(p.end, "heal", partition=p)]
    return sorted(changes, key=lambda c: (c.at, c.kind != "heal", c.kind != "join"))


class _Churner:
    """Applies scheduled changes to a running cluster with real signals and real link cuts."""

    def __init__(
        self, cluster: DaemonCluster, network: BridgedNetwork, changes: list[_Change]
    ) -> None:
        self.cluster = cluster
        self.network = network
        self.pending = list(changes)
        self.applied: list[dict[str, object]] = []
        self.cuts: Counter[tuple[int, int]] = Counter()
        self.leaves = 0
        self.on_leave: Callable[[int], None] = lambda _i: None

    @property
    def next_at(self) -> float:
        return self.pending[0].at if self.pending else math.inf

    def apply_due(self, elapsed: float) -> None:
        while self.pending and self.pending[0].at <= elapsed:
            change = self.pending.pop(0)
            record: dict[str, object] = {"time": round(elapsed, 2), "change": change.kind}
            if change.kind == "leave":
                record.update(node=change.node, signal=self._leave(change.node))
            elif change.kind == "join":
                record.update(node=change.node, started=self._join(change.node))
            else:
                assert change.partition is not None
                if change.kind == "heal":  # what the cut did: connected peers per node
                    record["connected_before"] = [
                        sum(p.state == "connected" for p in s.peers) if s is not None else None
                        for s in (self.cluster.status(i) for i in range(len(self.cluster.nodes)))
                    ]
                record.update(links=self._partition(change.partition, change.kind == "cut"))
            print(f"{change.kind}: {record}", flush=True)
            self.applied.append(record)

    def _leave(self, index: int) -> str:
        """Stop a daemon: SIGTERM (it checkpoints and exits) and SIGKILL (a crash) by turns."""
        sig = signal.SIGTERM if self.leaves % 2 == 0 else signal.SIGKILL
        self.leaves += 1
        self.on_leave(index)
        self.cluster.kill(index, sig)
        if self.cluster.wait(index, 20.0) is None:
            self.cluster.kill(index, signal.SIGKILL)
            self.cluster.wait(index, 5.0)
            return f"{sig.name}, then SIGKILL after 20 s"
        return sig.name

    def _join(self, index: int) -> bool:
        if self.cluster.nodes[index].running or index in self.cluster.spec.absent:
            return False
        self.cluster.start(index)  # resumes from its newest valid checkpoint
        return True

    def _partition(self, p: PartitionSpec, cut: bool) -> int:
        n = len(self.cluster.nodes)
        pairs = [
            (a, b)
            for a in range(n)
            for b in range(a + 1, n)
            if a * p.groups // n != b * p.groups // n  # the virtual engine's grouping
        ]
        for pair in pairs:
            self.cuts[pair] += 1 if cut else -1
            if cut and self.cuts[pair] == 1:
                self.network.cut(*pair)
            elif not cut and self.cuts[pair] == 0:
                self.network.heal(*pair)
        return len(pairs)


def _run_setup(
    scenario: Scenario, setup: SetupSpec, progress: Progress | None, task: Any = None
) -> SetupResult:
    if setup.protocol == "centralized":
        return _run_centralized(scenario, setup, progress)
    from p2pfl.sim.netns import netem_available

    spec = _cluster_spec(scenario, setup, task)
    stop = setup.stop or scenario.stop
    net = scenario.network
    not_applied = virtual_only(scenario, setup)
    if net.bandwidth_mbps < 1000:
        not_applied.append("network.bandwidth_mbps")
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="p2pfl-sim-", dir="/tmp"))
    report = progress or (lambda _setup, _fraction, _status: None)
    with (
        _Teardown(root) as teardown,
        # Started first: it imports torch, aiortc and the daemon while the network is built.
        ForkServer(root, root / "forkserver.log") as fork_server,
        BridgedNetwork(spec.n_nodes) as network,
        DaemonCluster(root, spec, network, fork_server=fork_server) as cluster,
        teardown.begins(),
    ):
        if net.latency_ms > 0 or net.loss > 0:
            if netem_available():
                for i in range(spec.n_nodes):
                    network.impair(i, delay_ms=net.latency_ms, loss_pct=net.loss * 100)
            else:
                not_applied.append("network.latency_ms/loss (no tc netem in this kernel)")
        if not_applied:  # said on screen, not only in results.json
            print(f"{setup.name}: not applied: {'; '.join(not_applied)}", flush=True)
        churner = _Churner(cluster, network, churn_schedule(scenario))
        cluster.start_all()
        for node in cluster.nodes:
            print(f"{node.name}: {_p2pfl_command()} status --socket {node.socket_path}", flush=True)
        _wait_ready(cluster, setup.name, report)
        histories: list[list[dict[str, float]]] = [[] for _ in cluster.nodes]
        curve: list[dict[str, float]] = []
        t0 = time.monotonic()
        interval = max(1.0, scenario.training.eval_interval)
        last: list[NodeStatus | None] = [None] * spec.n_nodes
        # A restarted daemon counts bytes from 0: what it sent before is carried here.
        carried: list[tuple[int, int]] = [(0, 0)] * spec.n_nodes

        def on_leave(index: int) -> None:
            status = cluster.status(index, timeout=2.0) or last[index]
            if status is not None:
                sent, received = carried[index]
                carried[index] = (sent + status.bytes_out, received + status.bytes_in)
            last[index] = None

        churner.on_leave = on_leave
        while True:
            elapsed = time.monotonic() - t0
            churner.apply_due(elapsed)
            statuses = [
                cluster.status(i) if node.running else None for i, node in enumerate(cluster.nodes)
            ]
            last = [
                s or (old if node.running else None)
                for s, old, node in zip(statuses, last, cluster.nodes, strict=True)
            ]
            # Attackers are not evaluated: the figures are the honest daemons' ([[attack]]).
            honest = [None if i in spec.attackers else s for i, s in enumerate(last)]
            _record(elapsed, honest, histories, curve, carried)
            done = _stop_reached(stop, elapsed, last)
            report(setup.name, min(1.0, elapsed / stop.time), _live_line(last))
            if done:
                break
            wake = min(interval, max(0.1, stop.time - elapsed), churner.next_at - elapsed)
            time.sleep(max(0.05, wake))
        wall = time.perf_counter() - started
        codes = cluster.stop_all(timeout=_STOP_TIMEOUT_S)
        nodes = [
            _node_result(node, status, history, codes.get(node.index), carried[node.index])
            for node, status, history in zip(cluster.nodes, last, histories, strict=True)
            if node.index not in spec.attackers
        ]
    if not curve:
        raise ProcessesEngineError(
            f"setup {setup.name!r}: no daemon reported an evaluation before the stop condition; "
            "give it more time ([stop] time)"
        )
    final = {k: v for k, v in curve[-1].items() if k not in ("time", "round", "bytes")}
    extra: dict[str, object] = {"run_time_s": curve[-1]["time"], "not_applied": not_applied}
    if churner.applied:
        extra["applied"] = churner.applied
    extra.update(describe(spec.attackers, [n.name for n in cluster.nodes]))
    result = SetupResult(
        name=setup.name,
        protocol=setup.protocol,
        aggregation=setup.aggregation,
        final=final,
        curve=curve,
        nodes=nodes,
        bytes_sent=sum(n.bytes_sent for n in nodes),
        bytes_received=sum(n.bytes_received for n in nodes),
        virtual_time_s=None,
        wall_time_s=wall,
        extra=extra,
    )
    return result


class _Teardown:
    """Ends a run completely, however it ends: daemons, network namespaces, temporary folder.

    The outermost context of a run (it removes the folder last) and, through ``begins()``, the
    innermost one: from the moment the run's body ends, SIGINT, SIGTERM and SIGHUP are held until
    the daemons are stopped, the namespaces deleted and the folder removed, so that a second
    Ctrl-C (an impatient one, or a SIGHUP when the terminal closes) cannot cut the cleanup short.
    A signal held while the run was ending normally is acted on afterwards.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._held: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Teardown:
        return self

    @contextlib.contextmanager
    def begins(self) -> Iterator[None]:
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            self._hold()
            print(
                f"p2pfl: interrupted; stopping the daemons, removing their network and {self.root}",
                file=sys.stderr,
                flush=True,
            )
            raise
        except BaseException:
            self._hold()
            raise
        self._hold()

    def _hold(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, _frame: object) -> None:
        self._held.append(signum)

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._held and not isinstance(exc, KeyboardInterrupt | SystemExit):
            signal.raise_signal(self._held[0])  # the run was interrupted as it ended


def _p2pfl_command() -> str:
    """How to call this interpreter's `p2pfl`, as a person would type it here.

    ``p2pfl`` when that is on PATH and the same program; else the script next to the
    interpreter (``.venv/bin/p2pfl`` from the checkout); else ``python -m p2pfl``.
    """
    script = Path(sys.executable).parent / "p2pfl"
    if not script.exists():
        return f"{sys.executable} -m p2pfl"
    if shutil.which("p2pfl") == str(script):
        return "p2pfl"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else str(script)


def _wait_ready(cluster: DaemonCluster, name: str, report: Progress) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    present = [i for i in range(len(cluster.nodes)) if i not in cluster.spec.absent]
    while time.monotonic() < deadline:
        ready = sum(cluster.status(i, timeout=2.0) is not None for i in present)
        report(name, 0.0, f"starting daemons: {ready}/{len(present)} ready")
        if ready == len(present):
            return
        for node in cluster.nodes:
            if node.process is not None and node.process.poll() is not None:
                raise ProcessesEngineError(
                    f"{node.name} exited with status {node.process.returncode} while starting:\n"
                    + cluster.log_tail(node.index, 5)
                )
        time.sleep(0.2)
    raise ProcessesEngineError(f"daemons not ready after {_READY_TIMEOUT_S:.0f} s")


def _record(
    elapsed: float,
    statuses: list[NodeStatus | None],
    histories: list[list[dict[str, float]]],
    curve: list[dict[str, float]],
    carried: list[tuple[int, int]],
) -> None:
    rows = []
    for status, history, (sent_before, _) in zip(statuses, histories, carried, strict=True):
        if status is None or not status.metrics:
            continue
        row = {
            "time": elapsed,
            "round": float(status.round),
            "bytes_sent": float(sent_before + status.bytes_out),
            **status.metrics,
        }
        history.append(row)
        rows.append(row)
    if rows:
        point = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "bytes_sent"}
        point["bytes"] = float(
            sum(c[0] for c in carried) + sum(s.bytes_out for s in statuses if s is not None)
        )
        curve.append(point)


def _stop_reached(stop: StopSpec, elapsed: float, statuses: list[NodeStatus | None]) -> bool:
    if elapsed >= stop.time:
        return True
    live = [s for s in statuses if s is not None]
    if stop.rounds is not None and live and all(s.round >= stop.rounds for s in live):
        return True
    sent = sum(s.bytes_out for s in live)
    return stop.megabytes is not None and sent >= stop.megabytes * 1e6


def _live_line(statuses: list[NodeStatus | None]) -> str:
    parts = []
    for i, s in enumerate(statuses):
        if s is None:
            parts.append(f"n{i} -")
            continue
        peers = sum(p.state == "connected" for p in s.peers)
        metric = f" {s.metric_value:.3f}" if s.metric_value is not None else ""
        parts.append(f"n{i} r{s.round}{metric} p{peers}")
    return " | ".join(parts)


def _node_result(
    node: DaemonNode,
    status: NodeStatus | None,
    history: list[dict[str, float]],
    exit_code: int | None,
    carried: tuple[int, int] = (0, 0),
) -> NodeResult:
    """``status`` is None for a node that was down at the end (churn): its figures are then
    those of its last evaluation seen (the last row of ``history``)."""
    final = (
        {k: v for k, v in history[-1].items() if k not in ("time", "round", "bytes_sent")}
        if history
        else {}
    )
    rounds = status.round if status is not None else int(history[-1]["round"] if history else 0)
    return NodeResult(
        node=node.identity.node_id,
        final=final,
        history=history,
        bytes_sent=carried[0] + (status.bytes_out if status else 0),
        bytes_received=carried[1] + (status.bytes_in if status else 0),
        rounds=rounds,
        extra={
            "name": node.name,
            "running_at_end": status is not None,
            "exit_code": exit_code,
            "rejected": dict(status.rejected) if status else {},
            "training": dict(status.training) if status else {},
            "transport": dict(status.transport) if status else {},
            "peers_connected": sum(p.state == "connected" for p in status.peers) if status else 0,
            "feature_bytes_sent": status.feature_bytes_sent if status else 0,
            "feature_bytes_received": status.feature_bytes_received if status else 0,
            # [live] replay_speed: replay step, rolling forecast MAE by horizon, halo ages.
            **({"live": status.live} if status is not None and status.live is not None else {}),
            # Whom it exchanged with (server-free neighbours): bytes sent to each peer.
            "bytes_out_by_peer": {p.node_id: p.bytes_out for p in status.peers} if status else {},
        },
    )


def _run_centralized(
    scenario: Scenario, setup: SetupSpec, progress: Progress | None
) -> SetupResult:
    """The baseline: one trainer on all the data in this process, for the same wall time."""
    from p2pfl.learning.ops import TaskWorkload

    stop = setup.stop or scenario.stop
    with task_errors(scenario):
        workload = TaskWorkload(scenario)
    workload.use_stream(setup.name)  # the virtual engine's stream for this setup
    epochs = setup.epochs if setup.epochs is not None else scenario.training.epochs
    weights = workload.initial()
    history: list[dict[str, float]] = []
    training = scenario.training
    # The same schedule and optimizer state as the virtual engine's baseline: the schedule by
    # the share of planned trainings (stop.rounds), else of the run's (here: wall) time.
    state: dict[str, Any] | None = {} if training.keep_optimizer else None
    started = time.perf_counter()
    rounds = 0
    while True:
        elapsed = time.perf_counter() - started
        metrics = workload.evaluate(weights)
        history.append({"time": elapsed, "round": float(rounds), "bytes_sent": 0.0, **metrics})
        if progress:
            progress(setup.name, min(1.0, elapsed / stop.time), f"epoch {rounds}")
        if elapsed >= stop.time or (stop.rounds is not None and rounds >= stop.rounds):
            break
        done = (
            training_progress(rounds, stop.rounds)
            if stop.rounds is not None
            else elapsed / stop.time
        )
        weights, _ = workload.train(
            None, weights, epochs, lr_scale=training.lr_scale(done), optimizer_state=state
        )
        rounds += 1
    final = {k: v for k, v in history[-1].items() if k not in ("time", "round", "bytes_sent")}
    curve = [{**{k: v for k, v in h.items() if k != "bytes_sent"}, "bytes": 0.0} for h in history]
    return SetupResult(
        name=setup.name,
        protocol="centralized",
        aggregation="-",
        final=final,
        curve=curve,
        nodes=[NodeResult("central", final, history, 0, 0, rounds, {})],
        bytes_sent=0,
        bytes_received=0,
        virtual_time_s=None,
        wall_time_s=time.perf_counter() - started,
        extra={},
    )
