"""The virtual-time engine: every node's protocol machine in one process, one virtual clock.

``run(scenario, progress=None) -> Results`` runs each ``[[setup]]`` of the scenario on the same
task, topology, churn schedule and partitions, and returns the results (see ``results``).

How it drives the machines (the same ``p2pfl.protocols`` machines the daemon drives):
- One event heap ordered by (virtual time, insertion number): deliveries, machine timers,
  training completions, churn, peer up/down notices, evaluation points. Nothing reads a clock.
- ``Train`` runs the real training at once (synchronously) and hands ``TrainingDone`` in after
  the modelled duration: samples processed / (samples_per_s x the node's speed factor).
- ``Send`` goes through ``NetworkModel`` (uplink FIFO at bandwidth, latency, loss, partitions).
  A model is encoded with the setup's ``codec`` and decoded for the receiver by the functions the
  daemon's driver uses (``learning.codecs``), so the receiver learns from the quantised model;
  the wire size is the encoded model plus a fixed envelope overhead (see ``_Codec``).
- Churn: a leaving node's machine is dropped (its in-flight events die with its session) and its
  neighbours get ``PeerDown`` after ``detect_s``; on rejoin a new machine starts from the node's
  last adopted model, as a daemon restarting from its checkpoint would.
- Timers: after every ``handle`` the engine reads ``next_deadline()`` and (re)schedules.
- ``max_peers``: each node runs ``protocols.PeerSampling`` as the daemon does
  (``daemon.sampling``), and its active view is the learner's peers. Discovery is the topology's
  links (``discovered``; a churned or partitioned peer is ``lost``). A ``Connect`` is a
  neighbour request that travels to the peer with the network's latency and loss (the daemon's
  signed offer or invite); the peer's ``neighbour_request`` decides and the answer travels back:
  refused (or the peer gone) is ``refused``, admitted opens the link on both ends at once
  (``link_up``, as a data channel opens on both). A ``Disconnect`` reaches the other end as
  ``link_down``. Shuffles are taken only over a link. The daemon's join timeout is longer
  (25 s: real signaling and ICE); here it is the machine's default, four periods.
Deterministic: every random draw comes from a ``random.Random`` seeded from the scenario seed and
a purpose string, and ties in time break by insertion order.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pfl.learning.attacks import AttackingLearner
from p2pfl.learning.codecs import LinkCodecs, encode_model
from p2pfl.learning.factory import SetupError, make_learner
from p2pfl.learning.neighbours import Position, resolve, task_positions, task_range_km
from p2pfl.learning.ops import Workload, is_graph_task
from p2pfl.learning.runtime import LearnerRuntime
from p2pfl.learning.setup import training_progress
from p2pfl.protocols import (
    Connect,
    Disconnect,
    FeatureReply,
    FeatureRequest,
    Learner,
    Message,
    MessageReceived,
    PeerDown,
    PeerSampling,
    PeerUp,
    SamplingAction,
    SamplingConfig,
    SamplingSend,
    ShuffleReply,
    ShuffleRequest,
    Start,
    TimerFired,
    TrainingDone,
    UseFeatures,
)
from p2pfl.sim.attacks import attackers, describe, poison_data
from p2pfl.sim.network import NetworkModel, build_topology
from p2pfl.sim.results import NodeResult, Results, SetupResult
from p2pfl.sim.scenario import Scenario, ScenarioError, SetupSpec, node_ids, scenario_error
from p2pfl.sim.workload import make_workload
from p2pfl.wire import WireError

ENVELOPE_OVERHEAD = 160
"""Bytes a signed envelope adds to a body: Ed25519 signature and key, kind, seq, time, framing
(the state-dict framing, names and shapes, which is the same for every codec, included)."""

Progress = Callable[[str, float, str], None]
"""progress(setup name, fraction done in [0, 1], status line)."""

# Event kinds, in the order they run when they fall on the same instant and were inserted together.
(
    _DELIVER,
    _TIMER,
    _TRAINED,
    _LEAVE,
    _JOIN,
    _PEER_UP,
    _PEER_DOWN,
    _EVAL,
    _SHUFFLE,
    _NEIGHBOUR_REQUEST,
    _NEIGHBOUR_ANSWER,
    _LINK_CLOSED,
) = range(12)
_ANY_SESSION = -2  # partition notices go to whichever session a node is in


@dataclass
class _Node:
    index: int
    id: str
    neighbours: list[int]
    speed: float
    machine: Learner[Any] | None = None
    runtime: LearnerRuntime[Any] | None = None
    links: LinkCodecs | None = None
    sampler: PeerSampling | None = None
    """max_peers: the session's peer sampling; its active view (the links) is the learner's
    peers."""
    shuffle_at: float | None = None
    largest_view: int = 0
    shuffles: int = 0
    sampling_dropped: Counter[str] = field(default_factory=Counter)
    alive: bool = True
    session: int = 0
    timer_at: float | None = None
    timer_version: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_lost: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    penalized: list[str] = field(default_factory=list)
    feature_bytes_received: int = 0
    feature_bytes_sent: int = 0
    models_sent_to: set[str] = field(default_factory=set)
    models_received_from: set[str] = field(default_factory=set)
    rounds_before: int = 0
    seen_finished: bool = False
    trainings: int = 0
    optimizer_state: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def shuffle_message_bytes(message: ShuffleRequest | ShuffleReply) -> int:
    """A shuffle's wire size: the envelope and, per entry, the id and its age (msgpack)."""
    return ENVELOPE_OVERHEAD + sum(len(node) + 8 for node, _ in message.entries)


NEIGHBOUR_MESSAGE_BYTES = ENVELOPE_OVERHEAD + 8
"""A neighbour request or its answer (the daemon's signed offer or invite and its reply; the
WebRTC session it sets up, SDP and ICE, is not modelled)."""


def feature_message_bytes(message: FeatureRequest | FeatureReply) -> int:
    """A feature exchange's wire size (models: ``_Codec``)."""
    if isinstance(message, FeatureRequest):
        return ENVELOPE_OVERHEAD + 4 * len(message.sensors)
    return ENVELOPE_OVERHEAD + 4 * len(message.sensors) + len(message.data)


class _Codec:
    """The setup's codec on every model a node sends: the bytes and what the receiver gets.

    Each node session holds a ``LinkCodecs`` (``learning.codecs``, the one the daemon's driver
    holds): a model is encoded for its link when sent and decoded by the receiver's when
    delivered (a lost message is never decoded, as on the wire). "fp32" is lossless
    (``decode_model(encode_model(w, "fp32"))`` is ``w`` bit for bit; see tests/sim/test_codec.py),
    so its models are passed as they are and counted as their raw tensor bytes. The bytes counted
    for any other codec are the encoded length less the fp32 encoding's framing of the same model
    (the names and shapes, which ``ENVELOPE_OVERHEAD`` stands for), so fp32 and the others compare
    on the same footing. A flat numpy parameter vector (``training.path = "vectorized"``) travels
    as a one-tensor state_dict.
    """

    def __init__(self, codec: str, workload: Workload) -> None:
        self.codec, self.workload = codec, workload
        self.framing: int | None = None
        self.last_sent: tuple[Any, bytes] | None = None  # one model sent to several peers
        self.last_received: tuple[bytes, Any] | None = None
        self.vector = False

    def encode(self, links: LinkCodecs, peer: str, weights: Any) -> tuple[Any, int]:
        """(what travels, the payload bytes counted) for one model sent to ``peer``."""
        nbytes = self.workload.nbytes(weights)
        if self.codec == "fp32":
            return weights, nbytes
        import numpy as np
        import torch

        self.vector = isinstance(weights, np.ndarray)
        state = {"params": torch.from_numpy(weights)} if self.vector else weights
        if self.framing is None:
            self.framing = len(encode_model(state, "fp32")) - nbytes
        if not links.per_link and self.last_sent is not None and self.last_sent[0] is weights:
            data = self.last_sent[1]
        else:
            data = links.encode(peer, state)
            self.last_sent = (weights, data)
        return data, len(data) - self.framing

    def decode(self, links: LinkCodecs, peer: str, carried: Any) -> Any:
        """The model the receiver rebuilds from what travelled; raises ``WireError``."""
        if self.codec == "fp32":
            return carried
        last = self.last_received
        if not links.per_link and last is not None and last[0] is carried:
            return last[1]
        received = links.decode(peer, carried)
        if self.vector:
            received = received["params"].numpy()
        self.last_received = (carried, received)
        return received


class _NodeHost:
    """One virtual node as the runtime's host: the network model, modelled training time,
    evaluation at once, the engine's event heap for timers."""

    def __init__(self, run: _SetupRun, node: _Node) -> None:
        self.run, self.node = run, node

    def send(self, peer: str, message: Message[Any]) -> None:
        self.run.send(self.node, peer, message)

    def train(self, weights: Any, budget: float) -> None:
        run, node = self.run, self.node
        new, report = run.workload.train(
            node.index,
            weights,
            budget,
            lr_scale=run.lr_scale(node.trainings),
            optimizer_state=run.optimizer_state(node),
        )
        node.trainings += 1
        duration = report.samples / (run.scenario.training.samples_per_s * node.speed)
        run.push(run.now + duration, _TRAINED, node.index, node.session, (new, report))

    def evaluate(self, weights: Any) -> dict[str, float]:
        return self.run.workload.evaluate(weights, self.node.index)

    def adopt(self, weights: Any) -> None:
        pass  # evaluation points read the machine's model

    def penalize(self, peer: str, reason: str) -> None:
        self.node.penalized.append(peer)

    def use_features(self, action: UseFeatures) -> None:
        self.node.feature_bytes_received += len(action.data)
        # Stored and trained on, as a daemon's HaloStore does (one recipe).
        self.run.workload.use_features(self.node.index, action.peer, action.sensors, action.data)

    def metric(self, name: str, value: float) -> None:
        pass  # results come from evaluation points

    def log(self, level: str, message: str) -> None:
        pass

    def dropped(self, reason: str, count: int, peer: str | None, *, local: bool) -> None:
        self.node.dropped[reason] += count

    def deadline(self, at: float | None) -> None:
        run, node = self.run, self.node
        if at != node.timer_at:
            node.timer_at = at
            node.timer_version += 1
            if at is not None:
                run.push(max(at, run.now), _TIMER, node.index, node.session, node.timer_version)


class _SetupRun:
    def __init__(
        self, scenario: Scenario, setup: SetupSpec, workload: Workload, progress: Progress | None
    ) -> None:
        self.scenario, self.setup, self.workload = scenario, setup, workload
        self.progress = progress
        self.stop = setup.stop or scenario.stop
        self.epochs = setup.epochs or scenario.training.epochs
        n = scenario.task.nodes
        self.ids = node_ids(n)
        seed = scenario.seed
        topology = build_topology(
            n, scenario.network.topology, scenario.network.degree, random.Random(f"{seed}:topology")
        )
        speeds = random.Random(f"{seed}:speed")
        spread = scenario.training.speed_spread
        self.nodes = [
            _Node(i, self.ids[i], topology[i], speeds.uniform(1 - spread, 1 + spread))
            for i in range(n)
        ]
        self.by_id = {node.id: node for node in self.nodes}
        self.network = NetworkModel(scenario.network, n, random.Random(f"{seed}:loss:{setup.name}"))
        self.heap: list[tuple[float, int, int, int, int, Any]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.bytes_total = 0
        self.curve: list[dict[str, float]] = []
        # [[attack]] (sim.attacks): attackers' machines are wrapped in new_machine, their data
        # poisoned for label-flip when the run starts, and they are not evaluated (the figures
        # are the honest nodes': eval_nodes of them, a fixed sample by seed).
        self.attackers = attackers(scenario, setup)
        honest = [i for i in range(n) if i not in self.attackers]
        k = scenario.training.eval_nodes
        eval_rng = random.Random(f"{seed}:eval")
        self.eval_nodes = sorted(eval_rng.sample(honest, k)) if 0 < k < len(honest) else honest
        # kind = "absent": those nodes are never started (no machine, no links, no traffic).
        self.absent = frozenset(i for i, a in self.attackers.items() if a.kind == "absent")
        if setup.learning is not None:
            self.learner = setup.learning
            self.peer_sets = self.resolve_neighbours()
            self.codec = _Codec(self.learner.codec, workload)
        self.max_peers = setup.learning.max_peers if setup.learning is not None else None
        if self.max_peers is not None:
            assert setup.learning is not None
            # Discovery knows the topology's links; the view picks max_peers of them. A node
            # shuffles once per gossip period (as the daemon does).
            self.shuffle_period = float(setup.learning.config().period)
            self.known = [
                frozenset(self.ids[j] for j in node.neighbours if j not in self.absent)
                for node in self.nodes
            ]

    # -- plumbing -------------------------------------------------------------------------

    def push(self, at: float, kind: int, node: int, session: int, payload: Any = None) -> None:
        heapq.heappush(self.heap, (at, next(self.seq), kind, node, session, payload))

    def new_machine(self, node: _Node, weights: Any) -> Learner[Any]:
        """The node's learner, by the factory the daemon uses (a rejoining node: a new one)."""
        rng = random.Random(f"{self.scenario.seed}:{self.setup.name}:{node.id}:{node.session}")
        try:
            machine = make_learner(
                self.learner,
                node.id,
                weights,
                self.workload.ops,
                rng,
                neighbours=self.peer_sets[node.index],
                features=self.workload.feature_plan(node.index, self.ids),
                rounds_done=node.rounds_before,
            )
        except SetupError as exc:
            raise self.error(exc.key, exc.problem) from None
        if node.index not in self.attackers:
            return machine
        colluders = [self.ids[i] for i in self.attackers if i != node.index]
        return AttackingLearner(machine, self.attackers[node.index], colluders=colluders)

    def error(self, key: str, problem: str) -> ScenarioError:
        index = self.scenario.setups.index(self.setup)
        return scenario_error(
            self.scenario.source, self.scenario.text, f"setup[{index}].{key}", problem
        )

    def resolve_neighbours(self) -> list[frozenset[str] | None]:
        """Each node's server-free peer set (None: all live peers); see learning.neighbours."""
        kind = self.setup.neighbours
        positions: dict[str, Position] | None = None
        range_km = self.setup.range_km
        if kind == "range":
            task = getattr(self.workload, "task", None)
            places = task_positions(task)
            if places is None or len(places) != len(self.nodes):
                raise self.error(
                    "neighbours",
                    f'"range" needs node positions; the task {self.scenario.task.name!r} has '
                    'none (graph tasks: one per cloudlet); use "all" or "topology"',
                )
            positions = dict(zip(self.ids, places, strict=True))
            range_km = range_km if range_km is not None else task_range_km(task)
        try:
            return [
                resolve(
                    kind,
                    node.id,
                    links=[self.ids[j] for j in node.neighbours],
                    positions=positions,
                    range_km=range_km,
                )
                for node in self.nodes
            ]
        except ValueError as exc:
            raise self.error("neighbours", str(exc)) from None

    def lr_scale(self, trainings_done: int) -> float:
        """The schedule's factor for a node's next training: by its share of the planned
        trainings (stop.rounds: one training per round or gossip tick; the setup's max_rounds,
        as the daemon computes it), else of stop.time. The centralized baseline reads
        [training]'s schedule, every other setup its own (``LearningSetup.lr_scale``)."""
        if self.stop.rounds is not None:
            progress = training_progress(trainings_done, self.stop.rounds)
        else:
            progress = self.now / self.stop.time
        if self.setup.learning is None:
            return self.scenario.training.lr_scale(progress)
        return self.setup.learning.lr_scale(trainings_done, progress)

    def optimizer_state(self, node: _Node) -> dict[str, Any] | None:
        learning = self.setup.learning
        keep = (learning or self.scenario.training).keep_optimizer
        if not keep:
            return None
        if node.optimizer_state is None:
            node.optimizer_state = {}
        return node.optimizer_state

    def start_session(self, node: _Node, weights: Any) -> None:
        """A new machine for ``node`` (at start, and on rejoin), run by the shared runtime."""
        node.machine = self.new_machine(node, weights)
        node.runtime = LearnerRuntime(node.machine, _NodeHost(self, node), lambda: self.now)
        node.links = LinkCodecs(self.learner.codec)  # a restart: the links start over
        if self.max_peers is not None:
            rng = random.Random(
                f"{self.scenario.seed}:{self.setup.name}:{node.id}:{node.session}:sampling"
            )
            config = SamplingConfig(view_size=self.max_peers, period=self.shuffle_period)
            node.sampler = PeerSampling(node.id, config, rng, self.known[node.index].__contains__)
            node.shuffle_at = None

    # -- links: every topology link, or the peer-sampling view (max_peers) ---------------------

    def peer_up(self, node: _Node, peer: str) -> None:
        if node.sampler is None:
            self.handle(node, PeerUp(peer))
        else:
            self.sampled(node, node.sampler.discovered([peer], self.now))

    def peer_down(self, node: _Node, peer: str) -> None:
        if node.sampler is None:
            self.handle(node, PeerDown(peer))
        else:
            self.sampled(node, node.sampler.lost(peer, self.now))

    def sampled(self, node: _Node, actions: list[SamplingAction]) -> None:
        """Perform the sampler's actions: shuffles go out, view changes become links."""
        assert node.sampler is not None
        for action in actions:
            if isinstance(action, SamplingSend):
                self.send(node, action.peer, action.message)
            elif isinstance(action, Connect):
                # The neighbour request travels to the peer, its answer back (_NEIGHBOUR_*).
                self.signal(node, action.peer, _NEIGHBOUR_REQUEST, action.priority)
            elif isinstance(action, Disconnect):
                self.signal(node, action.peer, _LINK_CLOSED, action.reason)
            else:
                for peer in action.removed:
                    self.handle(node, PeerDown(peer))
                for peer in action.added:
                    self.handle(node, PeerUp(peer))
        node.largest_view = max(node.largest_view, len(node.sampler.view))
        at = node.sampler.next_deadline()
        if at is not None and at != node.shuffle_at:
            node.shuffle_at = at
            self.push(max(at, self.now), _SHUFFLE, node.index, node.session, at)

    def signal(self, src: _Node, peer: str, kind: int, value: Any) -> None:
        """A link's signaling from ``src`` to ``peer`` (request, answer, close): one small
        message after the network's latency, lost with the network's loss as any message is
        (a lost request is then given up at the sampler's join timeout)."""
        dst = self.by_id[peer]
        arrival = self._transmit(src, dst, NEIGHBOUR_MESSAGE_BYTES)
        if arrival is not None:
            self.push(arrival, kind, dst.index, dst.session, (src.index, src.session, value))

    def _transmit(self, src: _Node, dst: _Node, size: int) -> float | None:
        """Count ``size`` bytes sent by ``src`` and put them on the network to ``dst``: their
        arrival time, or None when the network lost them (counted by cause)."""
        src.bytes_sent += size
        src.messages_sent += 1
        self.bytes_total += size
        sent = self.network.transmit(src.index, dst.index, size, self.now)
        if sent.lost is not None:
            src.messages_lost[sent.lost] += 1
            return None
        return sent.arrival

    def on_signal(self, node: _Node, kind: int, session: int, payload: Any) -> None:
        """A link's signaling arrives (see ``signal``); the link exists once both ends admitted
        it: the answer's arrival opens it on both ends at once."""
        src_index, src_session, value = payload
        src = self.nodes[src_index]
        current = src.alive and src.session == src_session and src.sampler is not None
        if not node.alive or node.session != session or node.sampler is None:
            if kind == _NEIGHBOUR_REQUEST and current:
                assert src.sampler is not None
                self.sampled(src, src.sampler.refused(node.id, self.now))
            return
        if kind == _NEIGHBOUR_REQUEST:
            if not current:
                return
            admitted, actions = node.sampler.neighbour_request(src.id, value, self.now)
            self.sampled(node, actions)
            self.signal(node, src.id, _NEIGHBOUR_ANSWER, admitted)
        elif kind == _NEIGHBOUR_ANSWER:
            if not current and value:
                return  # answered a session that ended: the request times out at the peer
            if not value or not current:
                self.sampled(node, node.sampler.refused(src.id, self.now))
                return
            assert src.sampler is not None
            if not node.sampler.wants(src.id):  # given up meanwhile: nobody holds the link
                self.sampled(src, src.sampler.link_down(node.id, self.now))
                return
            self.sampled(node, node.sampler.link_up(src.id, self.now))
            if node.sampler.wants(src.id):
                self.sampled(src, src.sampler.link_up(node.id, self.now))
                if not src.sampler.wants(node.id):
                    self.sampled(node, node.sampler.link_down(src.id, self.now))
            else:
                self.sampled(src, src.sampler.link_down(node.id, self.now))
        elif current:  # _LINK_CLOSED
            self.sampled(node, node.sampler.link_down(src.id, self.now))

    def handle(self, node: _Node, event: Any) -> None:
        assert node.runtime is not None and node.links is not None
        if isinstance(event, PeerUp):  # a new session on the link, as the daemon's driver sees
            node.links.restart(event.peer)
        node.runtime.handle(event)

    def send(
        self, src: _Node, peer: str, message: Message[Any] | ShuffleRequest | ShuffleReply
    ) -> None:
        dst = self.by_id[peer]
        if isinstance(message, ShuffleRequest | ShuffleReply):
            size = shuffle_message_bytes(message)
        elif isinstance(message, FeatureRequest | FeatureReply):
            size = feature_message_bytes(message)
            if isinstance(message, FeatureReply):
                src.feature_bytes_sent += len(message.data)
        else:
            assert src.links is not None
            try:
                carried, payload = self.codec.encode(src.links, peer, message.weights)
            except ValueError:
                # The codec cannot carry this model (fp16 past 65504, NaN or inf with a lossy
                # codec): not sent, counted, as the daemon's driver does.
                src.messages_sent += 1
                src.messages_lost["unencodable"] += 1
                return
            message = dataclasses.replace(message, weights=carried)
            size = ENVELOPE_OVERHEAD + payload
            src.models_sent_to.add(peer)
        arrival = self._transmit(src, dst, size)
        if arrival is not None:
            self.push(arrival, _DELIVER, dst.index, -1, (src.id, message, size))

    # -- the run --------------------------------------------------------------------------

    def run(self) -> SetupResult:
        started = time.perf_counter()
        poison_data(self.workload, self.attackers)  # [[attack]] label-flip (sim.attacks)
        if self.setup.protocol == "centralized":
            return self.run_centralized(started)
        self.schedule_churn_and_partitions()
        initial = self.workload.initial()
        present = [node for node in self.nodes if node.index not in self.absent]
        for node in self.nodes:
            if node.index in self.absent:
                node.alive = False
            else:
                self.start_session(node, initial)
        for node in present:
            if node.sampler is not None:
                self.sampled(node, node.sampler.discovered(self.known[node.index], 0.0))
                self.sampled(node, node.sampler.start(0.0))
            else:
                for j in node.neighbours:
                    if j not in self.absent:
                        self.handle(node, PeerUp(self.ids[j]))
            self.handle(node, Start())
        self.push(0.0, _EVAL, -1, 0)
        budget = None if self.stop.megabytes is None else self.stop.megabytes * 1e6
        last_report = -1.0
        while self.heap:
            at, _, kind, index, session, payload = heapq.heappop(self.heap)
            if at > self.stop.time:
                break
            self.now = at
            self.dispatch(kind, index, session, payload)
            if budget is not None and self.bytes_total >= budget:
                break
            if self.finished_now(kind, index):
                break
            if self.progress and at - last_report >= self.stop.time / 200:
                last_report = at
                self.progress(self.setup.name, at / self.stop.time, self.status())
        return self.finish(started)

    def dispatch(self, kind: int, index: int, session: int, payload: Any) -> None:
        if kind == _EVAL:
            self.evaluate_point()
            self.push(self.now + self.scenario.training.eval_interval, _EVAL, -1, 0)
            return
        node = self.nodes[index]
        if kind == _DELIVER:
            src, message, size = payload
            if not node.alive:
                self.by_id[src].messages_lost["receiver_down"] += 1
                return
            node.bytes_received += size
            if isinstance(message, ShuffleRequest | ShuffleReply):
                if node.sampler is not None and node.sampler.wants(src):
                    self.sampled(node, node.sampler.received(src, message, self.now))
                return
            if not isinstance(message, FeatureRequest | FeatureReply):
                assert node.links is not None
                try:
                    weights = self.codec.decode(node.links, src, message.weights)
                except WireError:  # e.g. a delta on a reference lost with a message
                    node.dropped["bad_weights"] += 1  # as the daemon's driver counts it
                    return
                message = dataclasses.replace(message, weights=weights)
                node.models_received_from.add(src)
            self.handle(node, MessageReceived(src, message))
        elif kind in (_NEIGHBOUR_REQUEST, _NEIGHBOUR_ANSWER, _LINK_CLOSED):
            self.on_signal(node, kind, session, payload)
        elif kind == _LEAVE:
            self.leave(node)
        elif kind == _JOIN:
            self.join(node)
        elif not node.alive or session not in (_ANY_SESSION, node.session):
            return  # addressed to a session that ended
        elif kind == _TIMER:
            if payload == node.timer_version:
                node.timer_at = None
                self.handle(node, TimerFired())
        elif kind == _TRAINED:
            self.handle(node, TrainingDone(*payload))
        elif kind == _SHUFFLE:
            if node.sampler is not None and payload == node.sampler.next_deadline():
                node.shuffle_at = None
                self.sampled(node, node.sampler.tick(self.now))
        elif kind == _PEER_UP:
            peer = self.nodes[payload]
            if peer.alive and not self.network.separated(index, payload, self.now):
                self.peer_up(node, peer.id)
        elif kind == _PEER_DOWN:
            peer_index, peer_session = payload
            if self.nodes[peer_index].session == peer_session or self.network.separated(
                index, peer_index, self.now
            ):
                self.peer_down(node, self.ids[peer_index])

    def schedule_churn_and_partitions(self) -> None:
        churn = self.scenario.churn
        n = len(self.nodes)
        if churn.fraction > 0:
            rng = random.Random(f"{self.scenario.seed}:churn")
            for i in sorted(rng.sample(range(n), round(churn.fraction * n))):
                leave = rng.uniform(churn.start, churn.end)
                self.push(leave, _LEAVE, i, -1)
                self.push(leave + churn.downtime, _JOIN, i, -1)
        detect = self.scenario.network.detect_s
        for p in self.scenario.network.partitions:
            for node in self.nodes:
                for j in node.neighbours:
                    if self.network.group(node.index, p) != self.network.group(j, p):
                        self.push(p.start + detect, _PEER_DOWN, node.index, _ANY_SESSION, (j, -1))
                        self.push(p.end, _PEER_UP, node.index, _ANY_SESSION, j)

    def leave(self, node: _Node) -> None:
        if not node.alive:
            return
        self.absorb_counters(node)
        node.alive = False
        node.session += 1
        node.optimizer_state = None  # a restarted node starts a fresh optimizer
        if node.sampler is not None:
            node.shuffles += node.sampler.shuffles
            node.sampling_dropped.update(node.sampler.dropped)
            node.sampler = None
        for j in node.neighbours:
            peer = self.nodes[j]
            if peer.alive:
                self.push(
                    self.now + self.scenario.network.detect_s,
                    _PEER_DOWN,
                    j,
                    peer.session,
                    (node.index, node.session),
                )

    def join(self, node: _Node) -> None:
        if node.alive or node.index in self.absent:
            return
        assert node.machine is not None
        checkpoint = node.machine.model
        node.session += 1
        node.alive = True
        node.timer_at = None
        node.seen_finished = False
        self.start_session(node, checkpoint)
        latency = self.scenario.network.latency_ms / 1000
        for j in node.neighbours:
            peer = self.nodes[j]
            if peer.alive and not self.network.separated(node.index, j, self.now):
                self.peer_up(node, peer.id)
                self.push(self.now + latency, _PEER_UP, j, peer.session, node.index)
        if node.sampler is not None:
            self.sampled(node, node.sampler.start(self.now))
        self.handle(node, Start())

    def absorb_counters(self, node: _Node) -> None:
        assert node.machine is not None
        node.rounds_before = self.rounds_of(node)

    def finished_now(self, kind: int, index: int) -> bool:
        """Every live node finished (checked when a node finishes, and at evaluation points)."""
        if kind != _EVAL:
            node = self.nodes[index]
            if node.machine is None or not node.machine.finished or node.seen_finished:
                return False
            node.seen_finished = True
        return all(n.machine is not None and n.machine.finished for n in self.nodes if n.alive)

    def rounds_of(self, node: _Node) -> int:
        """Gossip: trainings over all sessions; rounds-based protocols: the round reached."""
        if node.machine is None or not node.alive:
            return node.rounds_before
        if self.setup.protocol == "gossip":
            return node.rounds_before + node.machine.rounds
        return max(node.rounds_before, node.machine.rounds)

    def status(self) -> str:
        live = [n for n in self.nodes if n.alive]
        mean_round = sum(self.rounds_of(n) for n in live) / max(len(live), 1)
        last = self.curve[-1].get(self.workload.primary_metric) if self.curve else None
        metric = f"{self.workload.primary_metric} {last:.4g}" if last is not None else ""
        return f"t={self.now:.0f}s round {mean_round:.1f} {self.bytes_total / 1e6:.1f} MB {metric}"

    def evaluate_point(self, *, final: bool = False) -> None:
        # Graph tasks score each node's model on its own sensors (as its daemon does), so two
        # nodes holding the same model still get their own scores.
        per_node = is_graph_task(self.scenario.task.name)
        cache: dict[tuple[int, int], dict[str, float]] = {}
        rows = []
        for i in self.eval_nodes:
            node = self.nodes[i]
            if not (node.alive or final) or node.machine is None:
                continue
            model = node.machine.model
            key = (i if per_node else -1, id(model))
            if key not in cache:
                cache[key] = self.workload.evaluate(model, i if per_node else None)
            metrics = cache[key]
            row = {
                "time": self.now,
                "round": float(self.rounds_of(node)),
                "bytes_sent": float(node.bytes_sent),
                **metrics,
            }
            node.history.append(row)
            rows.append(row)
        if rows:
            point = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "bytes_sent"}
            point["bytes"] = float(self.bytes_total)
            self.curve.append(point)

    def finish(self, started: float) -> SetupResult:
        if not self.curve or self.curve[-1]["time"] != self.now:
            self.evaluate_point(final=True)
        for node in self.nodes:
            if node.alive:
                self.absorb_counters(node)
        nodes = []
        for i in self.eval_nodes:
            node = self.nodes[i]
            final = (
                {
                    k: v
                    for k, v in node.history[-1].items()
                    if k not in ("time", "round", "bytes_sent")
                }
                if node.history
                else {}
            )
            extra: dict[str, Any] = {
                "alive": node.alive,
                "sessions": node.session // 2 + 1,
                "messages_sent": node.messages_sent,
                "messages_lost": dict(sorted(node.messages_lost.items())),
                "dropped": dict(sorted(node.dropped.items())),
                "penalized": node.penalized,
                "feature_bytes_sent": node.feature_bytes_sent,
                "feature_bytes_received": node.feature_bytes_received,
            }
            if self.max_peers is not None:  # the view and the shuffles' refusals
                sampler = node.sampler
                dropped = node.sampling_dropped + (sampler.dropped if sampler else Counter())
                extra["view"] = sorted(sampler.active) if sampler else []
                extra["passive"] = sorted(sampler.passive) if sampler else []
                extra["largest_view"] = node.largest_view
                extra["shuffles"] = node.shuffles + (sampler.shuffles if sampler else 0)
                extra["sampling_dropped"] = dict(sorted(dropped.items()))
            if self.setup.protocol == "server-free":  # whom it exchanged models with
                extra["models_sent_to"] = sorted(node.models_sent_to)
                extra["models_received_from"] = sorted(node.models_received_from)
            nodes.append(
                NodeResult(
                    node.id,
                    final,
                    node.history,
                    node.bytes_sent,
                    node.bytes_received,
                    node.rounds_before,
                    extra,
                )
            )
        final_point = self.curve[-1]
        finals = {k: v for k, v in final_point.items() if k not in ("time", "round", "bytes")}
        return SetupResult(
            name=self.setup.name,
            protocol=self.setup.protocol,
            aggregation=self.setup.aggregation,
            final=finals,
            curve=self.curve,
            nodes=nodes,
            bytes_sent=sum(n.bytes_sent for n in self.nodes),
            bytes_received=sum(n.bytes_received for n in self.nodes),
            virtual_time_s=self.now,
            wall_time_s=time.perf_counter() - started,
            extra={
                "nodes_total": len(self.nodes),
                "evaluated_nodes": len(self.eval_nodes),
                "model_bytes": self.workload.nbytes(self.workload.initial()),
                # Only when not the default, so fp32 results stay what they were.
                **({"codec": self.learner.codec} if self.learner.codec != "fp32" else {}),
                **describe(self.attackers, self.ids),
            },
        )

    def run_centralized(self, started: float) -> SetupResult:
        """One trainer on all the data, evaluated after every training; no network."""
        weights = self.workload.initial()
        speed = self.scenario.training.samples_per_s
        history = []
        rounds = 0
        state: dict[str, Any] | None = {} if self.scenario.training.keep_optimizer else None
        while True:
            metrics = self.workload.evaluate(weights)
            history.append({"time": self.now, "round": float(rounds), "bytes_sent": 0.0, **metrics})
            if self.stop.rounds is not None and rounds >= self.stop.rounds:
                break
            weights, report = self.workload.train(
                None,
                weights,
                self.epochs,
                lr_scale=self.lr_scale(rounds),
                optimizer_state=state,
            )
            duration = report.samples / speed
            if self.now + duration > self.stop.time:
                break
            self.now += duration
            rounds += 1
            if self.progress:
                self.progress(self.setup.name, self.now / self.stop.time, f"epoch {rounds}")
        curve = [
            {**{k: v for k, v in h.items() if k != "bytes_sent"}, "bytes": 0.0} for h in history
        ]
        final = {k: v for k, v in history[-1].items() if k not in ("time", "round", "bytes_sent")}
        node = NodeResult("central", final, history, 0, 0, rounds, {})
        return SetupResult(
            name=self.setup.name,
            protocol="centralized",
            aggregation="-",
            final=final,
            curve=curve,
            nodes=[node],
            bytes_sent=0,
            bytes_received=0,
            virtual_time_s=self.now,
            wall_time_s=time.perf_counter() - started,
            extra={"model_bytes": self.workload.nbytes(weights)},
        )


def run(
    scenario: Scenario, *, progress: Progress | None = None, workload: Workload | None = None
) -> Results:
    """Run every setup of ``scenario`` in virtual time; deterministic for the scenario's seed."""
    if scenario.live.replay_speed > 0:
        raise scenario_error(
            scenario.source,
            scenario.text,
            "live.replay_speed",
            "live replay runs against the wall clock, which the virtual engine does not have; "
            "run with --engine processes",
        )
    workload = workload or make_workload(scenario)
    setups = []
    for setup in scenario.setups:
        # Each setup draws its training shuffles from its own stream (seed and name), so its
        # results do not depend on which setups ran before it.
        workload.use_stream(setup.name)
        setups.append(_SetupRun(scenario, setup, workload, progress).run())
    return Results(
        scenario=scenario.name,
        engine="virtual",
        seed=scenario.seed,
        task=scenario.task.name,
        primary_metric=workload.primary_metric,
        higher_is_better=workload.higher_is_better,
        setups=setups,
        scenario_source=dict(scenario.raw),
    )
