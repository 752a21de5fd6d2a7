"""The node: one trio nursery holding everything a daemon runs.

``prepare(config)`` does every check that can fail before anything starts listening, and turns
each failure into a :class:`StartupError` with a one-line message and an exit status (2 bad
configuration, 3 identity or trust files, 4 data); ``Node.run()`` then runs, in one nursery:
the control server, the Prometheus endpoint (optional), the transport (discovery, signaling,
WebRTC), the protocol driver with its trainer, the checkpointer, sd_notify's status and watchdog,
and the signal handler.

Signals: SIGTERM/SIGINT, and the control socket's ``stop`` command (`p2pfl stop`), stop taking
work (the driver is cancelled; a running training step is finished by the executor, its result
unused), write a final checkpoint, close every connection and return within
``[limits] stop_timeout_s``. SIGHUP re-reads the configuration file and
applies what can change at run time: the log level, the trust policy (allowlist or federation
key) and new static peers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import random
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pfl import __version__
from p2pfl.daemon.checkpoint import Checkpoint, CheckpointStore
from p2pfl.daemon.config import (
    EXIT_CONFIG,
    Config,
    ConfigError,
    load_config,
    read_turn_credentials,
)
from p2pfl.daemon.control import (
    CheckpointStatus,
    ControlError,
    ControlServer,
    NodeStatus,
    PeerStatus,
)
from p2pfl.daemon.driver import (
    NodeState,
    ProtocolDriver,
    SideChannels,
    rejected_from,
    rejected_messages,
)
from p2pfl.daemon.drops import DropLog
from p2pfl.daemon.metrics import NodeMetrics, set_log_level
from p2pfl.daemon.notify import SystemdNotifier, systemd_unit
from p2pfl.daemon.revocations import RevocationKeeper, load_revocations
from p2pfl.identity import KEY_FILE, IdentityError, NodeIdentity
from p2pfl.trust import CERTIFICATE_FILE, TrustError, TrustPolicy

if TYPE_CHECKING:
    from p2pfl.learning.setup import LearningSetup

log = logging.getLogger(__name__)

EXIT_IDENTITY = 3
EXIT_DATA = 4
_MIB = 1024 * 1024
_STATUS_INTERVAL_S = 5.0


class StartupError(Exception):
    """The node cannot start; ``str()`` is the one line to show, ``exit_code`` the status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Prepared:
    """Everything checked and loaded before the node starts listening."""

    config: Config
    identity: NodeIdentity
    trust: TrustPolicy
    certificate: bytes | None
    trainer: Any  # p2pfl.daemon.trainer.NodeTrainer (imports torch)
    machine: Any  # a p2pfl.protocols.Learner over state_dicts
    checkpoints: CheckpointStore
    resumed: Checkpoint | None
    lock_fd: int
    halo: Any = None  # p2pfl.learning.features.HaloStore of a graph task's cloudlet, or None
    host: str = ""
    """The address to listen on: [discovery] interface's, looked up once here, else listen_host."""


def load_trust(config: Config, identity: NodeIdentity) -> tuple[TrustPolicy, bytes | None]:
    trust = config.trust
    if trust.mode == "open":
        return TrustPolicy.open(), None
    if trust.mode == "allowlist":
        assert trust.allowlist is not None  # checked by the config loader
        try:
            return TrustPolicy.load_allowlist(trust.allowlist), None
        except (OSError, TrustError, IdentityError, ValueError) as exc:
            raise StartupError(
                f"[trust] allowlist {trust.allowlist}: {exc}", EXIT_IDENTITY
            ) from None
    policy = TrustPolicy.federation(bytes.fromhex(trust.federation_public_key))
    load_revocations(config, policy)  # before our own check: a revoked node does not start
    cert_path = trust.certificate or config.state_dir / CERTIFICATE_FILE
    try:
        certificate = cert_path.read_bytes()
    except OSError as exc:
        raise StartupError(
            f"membership certificate {cert_path}: {exc.strerror}; ask the federation operator "
            f"for one (`p2pfl federation admit --node-key {identity.public_key.hex()} ...`) "
            "and put it there, or set [trust] certificate",
            EXIT_IDENTITY,
        ) from None
    try:
        policy.check(identity.public_key, certificate, now=time.time())
    except TrustError as exc:
        raise StartupError(
            f"membership certificate {cert_path} does not admit this node ({exc.reason}): {exc}",
            EXIT_IDENTITY,
        ) from None
    return policy, certificate


def interface_address(name: str) -> str:
    """The IPv4 address of network interface ``name`` (SIOCGIFADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("256s", name.encode()[:15])
        try:
            reply = fcntl.ioctl(sock.fileno(), 0x8915, request)
        except OSError as exc:
            raise StartupError(
                f"[discovery] interface {name!r}: {exc.strerror} (no such interface, or it "
                "has no IPv4 address)",
                EXIT_CONFIG,
            ) from None
    return socket.inet_ntoa(reply[20:24])


def _lock_state_dir(state_dir: Path) -> int:
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another p2pfl daemon is using the state directory {state_dir}; stop it, or give "
            "this one its own [node] state_dir",
            EXIT_CONFIG,
        ) from None
    return fd


def prepare(config: Config, *, check: bool = False) -> Prepared:
    """Check and load everything; raise StartupError with the reason and exit status.

    ``check`` (`p2pfl run --check`) writes nothing: no state directory, node key, lock file or
    checkpoint clean-up (a missing key is generated in memory only), and takes no lock, so a
    configuration can be checked while its daemon runs.
    """
    state_dir = config.state_dir
    try:
        if check:
            identity = _identity_for_check(config)
        else:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            identity = NodeIdentity.load_or_create(state_dir)
    except IdentityError as exc:
        raise StartupError(str(exc), EXIT_IDENTITY) from None
    except OSError as exc:
        raise StartupError(f"state directory {state_dir}: {exc.strerror}", EXIT_CONFIG) from None
    trust, certificate = load_trust(config, identity)
    host = config.discovery.listen_host
    if config.discovery.interface:  # here, so that --check says it if it is not there
        host = interface_address(config.discovery.interface)

    task_cfg = config.task
    if task_cfg.data is not None and not task_cfg.data.exists():
        raise StartupError(
            f"[task] data {task_cfg.data}: no such file or directory; put the data there or "
            "fix the path",
            EXIT_DATA,
        )
    from p2pfl.daemon.trainer import NodeTrainer  # torch: only the daemon pays for it
    from p2pfl.learning.ops import is_graph_task, node_task

    if task_cfg.data is not None and task_cfg.name.startswith("digits"):
        raise config.error("task.data", f"task {task_cfg.name!r} has its data built in")
    options: dict[str, Any] = dict(task_cfg.options)
    if is_graph_task(task_cfg.name) and "cloudlet" in options:
        raise config.error(
            "task.options.cloudlet", "a cloudlet daemon's cloudlet is [task] node_index"
        )
    try:
        # Graph tasks: its own sensors' readings only (the engines build theirs the same way).
        task = node_task(
            task_cfg.name,
            task_cfg.node_index,
            n_nodes=task_cfg.n_nodes,
            partition=task_cfg.partition,
            alpha=task_cfg.alpha,
            seed=task_cfg.seed,
            lr=task_cfg.lr,
            batch_size=task_cfg.batch_size,
            readings=task_cfg.data,
            options=options,
        )
    except ValueError as exc:
        # Only a traffic task imports the readings module (a digits daemon never loads it).
        readings = sys.modules.get("p2pfl.ml.readings")
        if readings is not None and isinstance(exc, readings.ReadingsError):
            raise StartupError(f"[task] data: {exc}", EXIT_DATA) from None
        raise config.error("task.name", str(exc)) from None
    except TypeError as exc:  # an option the task does not take
        raise config.error("task.options", str(exc)) from None
    except OSError as exc:
        raise StartupError(f"[task] data {task_cfg.data}: {exc}", EXIT_DATA) from None
    ignored = getattr(task, "ignored_sensors", ())
    if ignored:
        log.warning(
            "readings of sensors owned by other cloudlets ignored: this cloudlet uses its own "
            "sensors' readings and asks the owners for its halo",
            extra={"ignored_sensors": len(ignored), "cloudlet": task_cfg.node_index},
        )
    # --check takes no lock (its daemon may be running): a descriptor for close_prepared instead.
    lock_fd = (
        os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) if check else _lock_state_dir(state_dir)
    )
    executor = config.executor
    try:
        trainer = NodeTrainer(
            task,
            task_cfg.node_index,
            device=executor.device,
            threads=executor.threads,
            mode=executor.mode,
            setup=learner_setup(config),
        )
    except ValueError as exc:  # e.g. a CUDA device torch cannot see
        os.close(lock_fd)
        raise config.error("executor.device", str(exc)) from None
    try:
        checkpoints = CheckpointStore(state_dir / "checkpoints", keep=config.checkpoints.keep)
        resumed, weights = (None, trainer.initial()) if check else _resume(checkpoints, trainer)
        if resumed is not None:  # the schedule goes on from where the last session left it
            trainer.trainings = _trainings_done(resumed.state)
        plan = _feature_plan(config, task)
        halo = _halo_store(task, task_cfg.node_index, plan, trainer)
        if config.data.replay_speed > 0 and halo is None:
            raise config.error(
                "data.replay_speed",
                "live replay needs a traffic task with [task] node_ids (the cloudlets whose "
                "readings it pushes and receives); set replay_speed = 0 or add them",
            )
        machine = build_machine(
            config,
            identity.node_id,
            weights,
            plan,
            rounds_done=int(resumed.state.get("round", 0)) if resumed is not None else 0,
        )
        if resumed is not None:
            _restore_machine(machine, resumed.state)
        trainer.warm_up()
    except BaseException:
        trainer.close()
        os.close(lock_fd)
        raise
    return Prepared(
        config,
        identity,
        trust,
        certificate,
        trainer,
        machine,
        checkpoints,
        resumed,
        lock_fd,
        halo,
        host,
    )


def _identity_for_check(config: Config) -> NodeIdentity:
    """The node key if there is one; else, where no certificate is needed, a stand-in."""
    state_dir = config.state_dir
    if (state_dir / KEY_FILE).exists():
        return NodeIdentity.load(state_dir)
    if config.trust.mode == "federation":
        raise IdentityError(
            f"no node key in {state_dir} yet, so no membership certificate can name it; create "
            f"it with `p2pfl keys init --state-dir {state_dir}` (or `p2pfl init`) and have the "
            "federation operator admit it"
        )
    return NodeIdentity.generate()  # the first start creates the real one


def _resume(store: CheckpointStore, trainer: Any) -> tuple[Checkpoint | None, Any]:
    from p2pfl.ml import validate_update
    from p2pfl.wire import WireError, decode_state_dict

    initial = trainer.initial()
    checkpoint, skipped = store.load_latest()
    for bad in skipped:
        log.warning("checkpoint skipped", extra={"path": str(bad.path), "reason": bad.reason})
    if checkpoint is None:
        return None, initial
    try:
        weights = decode_state_dict(checkpoint.model)
    except WireError as exc:
        log.warning("checkpoint model unreadable", extra={"reason": exc.reason})
        return None, initial
    reason = validate_update(initial, weights)
    if reason is not None:
        log.warning(
            "checkpoint is for another model (task changed?); starting fresh",
            extra={"path": str(checkpoint.path), "reason": reason},
        )
        return None, initial
    log.info(
        "resuming from checkpoint",
        extra={"seq": checkpoint.seq, "round": checkpoint.state.get("round", 0)},
    )
    return checkpoint, weights


def _feature_plan(config: Config, task: Any) -> Any:
    """Graph tasks with [task] node_ids: which halo readings to ask of whom, what to serve."""
    if not config.task.node_ids:
        return None
    from p2pfl.learning.ops import feature_plan

    return feature_plan(
        task,
        config.task.node_index,
        list(config.task.node_ids),
        timeout=config.task.features_timeout_s,
    )


def _halo_store(task: Any, node: int, plan: Any, trainer: Any) -> Any:
    """A cloudlet's store of the halo readings its owners send (None without a plan)."""
    if plan is None or getattr(task, "cloudlet", None) is None:
        return None
    from p2pfl.learning.features import HaloStore

    def use(data: Any) -> None:
        trainer.data = data  # the next training and evaluation run on it

    return HaloStore(task, node, plan, use)


def neighbour_set(config: Config, node_id: str) -> frozenset[str] | None:
    """Server-free's peers by [protocol] neighbours (None: all live peers).

    "range": the members listed in [protocol.positions] within range_km of [node] position.
    Positions are configuration, like the allowlist, keyed by node id (bound to the member's
    key): no peer can claim a position over the network, and an unlisted peer is never in range.
    """
    from p2pfl.learning.neighbours import resolve

    proto = config.protocol
    positions = {k: (v[0], v[1]) for k, v in proto.positions.items()}
    if config.node.position:
        positions[node_id] = (config.node.position[0], config.node.position[1])
    try:
        return resolve(
            proto.neighbours,
            node_id,
            links=proto.neighbour_ids,
            positions=positions,
            range_km=proto.range_km,
        )
    except ValueError as exc:
        raise config.error("protocol.neighbours", str(exc)) from None


def learner_setup(config: Config) -> LearningSetup:
    """The setup description the configuration gives the factory (a scenario's [[setup]] gives
    the same one: ``p2pfl.sim.scenario.SetupSpec.learning``), checked when it was loaded."""
    return config.protocol.setup


def build_machine(
    config: Config, node_id: str, weights: Any, features: Any = None, *, rounds_done: int = 0
) -> Any:
    """The learner the [protocol] table describes, by the factory the engines use too."""
    from p2pfl.learning.factory import SetupError, make_learner
    from p2pfl.learning.ops import StateDictOps

    proto = config.protocol
    setup = learner_setup(config)
    neighbours = neighbour_set(config, node_id)
    try:
        return make_learner(
            setup,
            node_id,
            weights,
            StateDictOps(),
            random.Random(f"{proto.seed}:{node_id}"),
            neighbours=neighbours,
            features=features,
            rounds_done=rounds_done,
        )
    except SetupError as exc:
        raise config.error(f"protocol.{exc.key}", exc.problem) from None


def machine_state(machine: Any, round_offset: int) -> dict[str, Any]:
    state: dict[str, Any] = {"round": round_offset + int(machine.rounds)}
    for attribute in ("age", "round"):
        value = getattr(machine, attribute, None)
        if isinstance(value, int):
            state[f"machine_{attribute}"] = value
    return state


def _trainings_done(state: dict[str, Any]) -> int:
    """Local trainings done before the restart (older checkpoints: the rounds done)."""
    for key in ("trainings", "round"):
        value = state.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


def _restore_machine(machine: Any, state: dict[str, Any]) -> None:
    # Gossip's age weighs our model against received ones; a restart must not reset it to 0.
    if isinstance(state.get("machine_age"), int) and hasattr(machine, "age"):
        machine.age = state["machine_age"]


class Node:
    def __init__(self, prepared: Prepared, *, config_path: Path | None = None) -> None:
        self.prepared = prepared
        self.config = prepared.config
        self.config_path = config_path
        self.identity = prepared.identity
        self.started_at = time.time()
        self.state = NodeState()
        if prepared.resumed is not None:
            self.state.round_offset = int(prepared.resumed.state.get("round", 0))
            self.state.round = self.state.round_offset
        self.metrics = NodeMetrics()
        self.drops = DropLog()
        """Every drop of this node, counted once: transport, signaling, driver (see drops.py)."""
        self.drops.add_hook(self.metrics.count_drop)
        self.notifier = SystemdNotifier.from_environment()
        self.systemd_unit = systemd_unit()
        self.last_checkpoint: Checkpoint | None = prepared.resumed
        self.transport: Any = None
        self.revocations: RevocationKeeper | None = None
        self.live: Any = None  # p2pfl.daemon.live.LiveFeed with [data] replay_speed
        self.links: Any = None  # p2pfl.daemon.sampling.SampledLinks with [limits] max_peers
        self._checkpointed_model: Any = None
        self._stop_requested = trio.Event()

    # ---- status ------------------------------------------------------------------------------

    def status(self) -> NodeStatus:
        state, config = self.state, self.config
        checkpoint = None
        if self.last_checkpoint is not None:
            c = self.last_checkpoint
            checkpoint = CheckpointStatus(seq=c.seq, digest=c.digest, created=c.created)
        transport = self.transport
        revocations = self.prepared.trust.revocations
        peers = []
        for p in state.peers.values():
            # The transport knows the member name (proven in signaling) and the heartbeat RTT.
            info = transport.peer_info(p.node_id) if transport is not None else None
            rtt = None if info is None or info.rtt_s is None else round(info.rtt_s * 1000, 3)
            peers.append(
                PeerStatus(
                    node_id=p.node_id,
                    name=(info.name or "") if info is not None else "",
                    state=p.state,
                    rtt_ms=rtt if p.state == "connected" else None,
                    bytes_in=p.bytes_in,
                    bytes_out=p.bytes_out,
                    last_seen=p.last_seen,
                    rejected=rejected_from(self.drops, p.node_id),
                    drops=self.drops.peer_totals(p.node_id),
                    address=info.address if info is not None and p.state == "connected" else None,
                    ice_path=info.ice_path if info is not None and p.state == "connected" else None,
                )
            )
        return NodeStatus(
            node_id=self.identity.node_id,
            short_id=self.identity.short_id,
            name=config.node.name,
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            now=time.time(),
            federation_id=self.prepared.trust.federation_id,
            trust_mode=config.trust.mode,
            protocol=config.protocol.name,
            task=config.task.name,
            round=state.round,
            model_updated_at=state.model_updated_at,
            last_loss=state.last_loss,
            metric_name=state.metric_name,
            metric_value=state.metric_value,
            training_state=state.training_state,
            metrics=dict(state.metrics),
            bytes_in=state.bytes_in,
            bytes_out=state.bytes_out,
            training_seconds=state.training_seconds,
            protocol_seconds=state.protocol_seconds,
            rejected=rejected_messages(self.drops),
            drops_by_stage=self.drops.stage_totals(),
            drops=self.drops.snapshot(),
            checkpoint=checkpoint,
            training=self.prepared.trainer.status(),
            peers=tuple(peers),
            transport=dict(self.transport.counters) if self.transport is not None else {},
            revocation_serial=None if revocations is None else revocations.serial,
            revoked=0 if revocations is None else len(revocations.revoked),
            mdns=config.discovery.mdns,
            static_peers=len(config.discovery.static_peers),
            log_file=None if config.logging.file is None else str(config.logging.file),
            systemd_unit=self.systemd_unit,
            feature_bytes_sent=int(getattr(self.prepared.machine, "bytes_features_sent", 0)),
            feature_bytes_received=int(
                getattr(self.prepared.machine, "bytes_features_received", 0)
            ),
            halo=None
            if self.prepared.halo is None
            else self.prepared.halo.status(getattr(self.prepared.machine, "learning", None)),
            live=None if self.live is None else self.live.status(),
            sampling=None if self.links is None else self.links.status(),
        )

    def _status_line(self) -> str:
        s = self.state
        connected = sum(1 for p in s.peers.values() if p.state == "connected")
        metric = f", {s.metric_name} {s.metric_value:.3f}" if s.metric_value is not None else ""
        return f"round {s.round}, {connected} peers{metric}"

    # ---- checkpoints -------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Write a checkpoint of the adopted model if it changed since the last one."""
        from p2pfl.wire import encode_state_dict

        model = self.state.model
        if model is None or model is self._checkpointed_model:
            return
        state = machine_state(self.prepared.machine, self.state.round_offset)
        state["trainings"] = int(self.prepared.trainer.trainings)

        def write() -> Checkpoint:
            data = encode_state_dict(model, "fp32")
            return self.prepared.checkpoints.save(data, state, now=time.time())

        self.last_checkpoint = await trio.to_thread.run_sync(write)
        self._checkpointed_model = model
        log.info("checkpoint written", extra={"seq": self.last_checkpoint.seq, **state})

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(self.config.checkpoints.interval_s)
            try:
                await self.checkpoint()
            except OSError as exc:  # e.g. no descriptor or disk left: retry next interval
                log.error(
                    "checkpoint failed; retrying at the next interval", extra={"error": str(exc)}
                )

    # ---- the nursery -------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit status."""
        from p2pfl.daemon.limits import raise_nofile_limit
        from p2pfl.daemon.signaling import SignalingLimits
        from p2pfl.daemon.transport import PeerTransport, TransportConfig
        from p2pfl.learning.codecs import LinkCodecs
        from p2pfl.wire import DEFAULT_LIMITS, EnvelopeVerifier

        config = self.config
        max_bytes = int(config.limits.max_message_mb * _MIB)
        turn = read_turn_credentials(config)
        transport_config = TransportConfig(
            host=self.prepared.host,
            signaling_port=config.discovery.signaling_port,
            mdns=config.discovery.mdns,
            static_peers=config.discovery.static_peers,
            ice_servers=config.discovery.ice_servers,
            turn_username=None if turn is None else turn.username,
            turn_credential=None if turn is None else turn.credential,
            relay_only=config.discovery.ice_transport_policy == "relay",
            path_mtu=config.discovery.path_mtu,
            peer_timeout_s=config.limits.peer_timeout_s,
            transfer_timeout_s=config.limits.transfer_timeout_s,
            max_message_bytes=max_bytes + _MIB,
            signaling=SignalingLimits(
                max_connections=config.limits.signaling_connections,
                max_per_source=config.limits.signaling_per_source,
                read_timeout_s=config.limits.signaling_read_timeout_s,
            ),
            max_pending_links=config.limits.pending_links,
            shed_fraction=config.limits.shed_fraction,
        )
        soft, hard = raise_nofile_limit()
        log.info("descriptor limit", extra={"soft": soft, "hard": hard})
        limits = dataclasses.replace(
            DEFAULT_LIMITS, max_frame_bytes=max_bytes + _MIB, max_bin_bytes=max_bytes
        )
        self.metrics.info.info(
            {
                "node_id": self.identity.node_id,
                "name": config.node.name,
                "protocol": config.protocol.name,
                "task": config.task.name,
                "version": __version__,
            }
        )
        if config.trust.mode == "open":
            log.warning("trust mode is OPEN: any machine on the network can join this federation")
        links = LinkCodecs(learner_setup(config).codec, limits)
        async with trio.open_nursery() as nursery:
            control = ControlServer(
                config.control_socket,
                {
                    "status": lambda _: self.status().to_json(),
                    "peers": self._peers_reply,
                    "stop": self._stop_reply,
                    "forecast": self._forecast_reply,
                },
            )
            await nursery.start(functools.partial(control.serve, drops=self.drops))
            if config.metrics.prometheus:
                port = await nursery.start(
                    functools.partial(self.metrics.serve, drops=self.drops),
                    config.metrics.host,
                    config.metrics.port,
                )
                log.info(
                    "metrics endpoint",
                    extra={"url": f"http://{config.metrics.host}:{port}/metrics"},
                )
            self.links = self.sampled_links()
            async with PeerTransport(
                self.identity,
                self.prepared.trust,
                transport_config,
                certificate=self.prepared.certificate,
                drops=self.drops,
                link_policy=self.links,
            ) as transport:
                self.transport = transport
                self.revocations = RevocationKeeper(transport, config.state_dir, self.drops)
                side_channels: list[Any] = [self.revocations]
                if config.data.replay_speed > 0:
                    from p2pfl.daemon.live import LiveFeed

                    self.live = LiveFeed(
                        self.prepared.trainer.task,
                        config.task.node_index,
                        self.prepared.halo.plan.needs,
                        config.task.node_ids,
                        speed=config.data.replay_speed,
                        drops=self.drops,
                        model=lambda: self.state.model,
                        on_step=self._live_metrics,
                    )
                    side_channels.append(self.live)
                if self.links is not None:
                    self.links.transport = transport
                    side_channels.append(self.links)
                connected = lambda key: True  # noqa: E731 (trust was proven in signaling)
                verifier = EnvelopeVerifier(
                    is_trusted=connected,
                    max_skew_s=config.limits.max_clock_skew_s,
                    limits=limits,
                    own_key=self.identity.public_key,
                )
                driver = ProtocolDriver(
                    self.prepared.machine,
                    identity=self.identity,
                    sink=transport,
                    trainer=self.prepared.trainer,
                    # The setup's codec on every link, by the class the virtual engine uses.
                    encode_weights=links.encode,
                    decode_weights=links.decode,
                    restart_link=links.restart,
                    state=self.state,
                    verifier=verifier,
                    observer=_MetricsObserver(self.metrics),
                    drops=self.drops,
                    primary_metric=self.prepared.trainer.task.primary_metric,
                    start_peers=config.protocol.start_peers,
                    start_timeout_s=config.protocol.start_timeout_s,
                    side_channel=SideChannels(*side_channels),
                    features=self.prepared.halo,
                )
                log.info(
                    "node started",
                    extra={
                        "node": self.identity.node_id,
                        "signaling": f"{self.prepared.host}:{transport.signaling_port}",
                        "control": str(config.control_socket),
                        "round": self.state.round,
                    },
                )
                async with trio.open_nursery() as work:
                    work.start_soon(driver.run, transport.events)
                    work.start_soon(self.revocations.run, driver.send_side)
                    if self.live is not None:
                        work.start_soon(self.live.run, driver.send_side)
                    if self.links is not None:
                        work.start_soon(self.links.run, driver.send_side)
                    work.start_soon(self._checkpoint_loop)
                    work.start_soon(self._status_loop)
                    work.start_soon(self.notifier.run_watchdog)
                    self.notifier.ready(self._status_line())
                    await self._wait_for_stop()
                    self.state.training_state = "stopping"
                    self.notifier.stopping()
                    log.info("stopping: no new steps; checkpointing")
                    work.cancel_scope.cancel()
                with trio.move_on_after(config.limits.stop_timeout_s) as scope:
                    scope.shield = True
                    await self.checkpoint()
            nursery.cancel_scope.cancel()
        log.info("stopped", extra={"round": self.state.round})
        return 0

    def _forecast_reply(self, message: Any) -> Any:
        """`p2pfl forecast`: the latest live forecast of this cloudlet's sensors."""
        if self.live is None:
            raise ControlError(
                "no live forecast: this daemon has no [data] replay_speed (a traffic task with "
                "[task] node_ids and replay_speed > 0 forecasts live)"
            )
        sensor = message.get("sensor")
        if sensor is not None and not isinstance(sensor, str):
            raise ControlError("sensor must be a sensor id (a string)")
        try:
            return self.live.forecast_reply(sensor)
        except ValueError as exc:
            raise ControlError(str(exc)) from None

    def _live_metrics(self, live: Any) -> None:
        live.export(self.metrics)

    def _peers_reply(self, _: Any) -> Any:
        return self.status().to_json()["peers"]

    def _stop_reply(self, _: Any) -> Any:
        """`p2pfl stop`: stop as SIGTERM does. The socket is 0600, so only the daemon's user (or
        root) gets here; the reply goes out before the socket closes."""
        if not self._stop_requested.is_set():
            log.info("stop requested over the control socket")
            self._stop_requested.set()
        return {"stopping": True, "pid": os.getpid()}

    async def _wait_for_stop(self) -> None:
        """Return on SIGTERM/SIGINT or a ``stop`` command; SIGHUP reloads and goes on waiting."""

        async def signalled(scope: trio.CancelScope) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        self.reload()
                        continue
                    log.info("signal received", extra={"signal": signal.Signals(signum).name})
                    scope.cancel()
                    return

        async def requested(scope: trio.CancelScope) -> None:
            await self._stop_requested.wait()
            scope.cancel()

        async with trio.open_nursery() as waiting:
            waiting.start_soon(signalled, waiting.cancel_scope)
            waiting.start_soon(requested, waiting.cancel_scope)

    async def _status_loop(self) -> None:
        while True:
            with trio.move_on_after(_STATUS_INTERVAL_S):
                await self.state.changed.wait()
            self.notifier.status(self._status_line())
            await trio.sleep(1.0)  # at most one STATUS= per second

    def sampled_links(self) -> Any:
        """With ``[limits] max_peers``: the view of that many links kept by peer sampling
        (``p2pfl.daemon.sampling.SampledLinks``), its draws seeded by ``[protocol] seed`` and
        the node id as the learner's are; shuffling once per gossip period, as the virtual
        engine's nodes do. None: a link to every member."""
        setup = learner_setup(self.config)
        if setup.max_peers is None:
            return None
        from p2pfl.daemon.sampling import SampledLinks

        node_id = self.identity.node_id
        return SampledLinks(
            node_id,
            setup.max_peers,
            float(setup.config().period),
            self.drops,
            random.Random(f"{self.config.protocol.seed}:{node_id}:sampling"),
        )

    def reload(self) -> None:
        """SIGHUP: re-read the configuration and apply what can change while running."""
        if self.config_path is None:
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            trust, certificate = load_trust(new, self.identity)
        except (ConfigError, StartupError) as exc:
            log.error("reload failed; keeping the running configuration", extra={"error": str(exc)})
            self.notifier.ready(self._status_line())
            return
        set_log_level(new.logging.level)
        if self.transport is not None and self.revocations is not None:
            self.revocations.use_policy(trust)  # keeps the newest list; re-checks live links
            from p2pfl.daemon.discovery import parse_static_peer

            for entry in set(new.discovery.static_peers) - set(self.config.discovery.static_peers):
                self.transport.add_candidate(parse_static_peer(entry))
        self.prepared.trust = trust
        unchanged = (
            "node",
            "protocol",
            "task",
            "data",
            "executor",
            "limits",
            "metrics",
            "checkpoints",
        )
        for section in unchanged:
            if getattr(new, section) != getattr(self.config, section):
                log.warning("changed [%s] needs a restart to take effect", section)
        live_discovery = dataclasses.replace(
            new.discovery, static_peers=self.config.discovery.static_peers
        )
        if live_discovery != self.config.discovery:  # static peers apply now, the rest at start
            log.warning("changed [discovery] keys other than static_peers need a restart")
        if certificate != self.prepared.certificate:
            # Presented in adverts and at signaling, and held by peers for the life of a link.
            log.warning("a changed [trust] certificate needs a restart to be presented to peers")
        if (new.logging.file, new.logging.format) != (
            self.config.logging.file,
            self.config.logging.format,
        ):
            log.warning("changed [logging] file or format needs a restart to take effect")
        self.config = new
        log.info("configuration reloaded", extra={"log_level": new.logging.level})
        self.notifier.ready(self._status_line())


class _MetricsObserver:
    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def on_bytes(self, received: int, sent: int) -> None:
        if received:
            self.metrics.bytes_received.inc(received)
        if sent:
            self.metrics.bytes_sent.inc(sent)

    def on_trained(self, report: Any, wall_s: float) -> None:
        self.metrics.training_steps.inc()
        self.metrics.training_seconds.inc(wall_s)
        self.metrics.samples.inc(int(report.samples))
        self.metrics.loss.set(float(report.loss))
        energy = getattr(report, "energy_j", None)
        if energy is not None:
            self.metrics.energy.inc(float(energy))

    def on_round(self, state: NodeState) -> None:
        self.metrics.round.set(state.round)
        self.metrics.peers.set(sum(1 for p in state.peers.values() if p.state == "connected"))
        if state.metric_value is not None:
            self.metrics.metric.labels(state.metric_name).set(state.metric_value)


def close_prepared(prepared: Prepared) -> None:
    """End the executor's worker process and release the state-directory lock."""
    prepared.trainer.close()
    with contextlib.suppress(OSError):
        os.close(prepared.lock_fd)
