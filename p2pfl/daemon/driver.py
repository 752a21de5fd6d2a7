"""The protocol driver: transport events -> protocol machine -> actions, in the trio loop.

The machine is sans-IO (``p2pfl.protocols``); this module is everything it leaves out:

- Time: the machine's clock is ``trio.current_time()``; after every ``handle`` the driver waits
  for the next event or ``machine.next_deadline()``, whichever comes first (a deadline passing is
  ``TimerFired``), so ``SetTimer`` actions need no bookkeeping of their own.
- Receiving: a frame from the transport is verified (signature, replay, skew, size: wire's
  ``EnvelopeVerifier``), checked to come from the peer whose connection carried it, and decoded
  (message fields, then tensors with wire's codec: never pickle) before the machine sees a
  ``MessageReceived``. Anything wrong is dropped and counted once in the node's
  :class:`~p2pfl.daemon.drops.DropLog`: stage ``envelope`` for the signed frame (signature, replay,
  skew, size, sender), stage ``update`` for its content (malformed message, bad weights) and for
  what the machine itself drops or penalizes.
- Sending: a ``Send`` is encoded with the wire tensor codec and sealed into a signed envelope,
  then handed to the transport; sends to one peer keep their order (a fair lock).
- Both run in a worker thread for messages over ``inline_bytes`` (1 MiB), in the loop below it.
- Side channel: frames of the daemon's own kinds (``trust.revocations``) are verified the same
  way and then handed to the ``side_channel`` (see ``p2pfl.daemon.revocations``), never to the
  machine; ``send_side`` sends its messages through the same sealing and per-peer order.
- Training and evaluation run on the trainer (torch in a worker thread); their results come back
  as ``TrainingDone`` / evaluation figures. At most one training is outstanding (the machine's
  invariant); evaluation of the adopted model runs whenever the model changed and none is running.

Everything an operator sees (`p2pfl status`, metrics, checkpoints) reads :class:`NodeState`,
which only this driver writes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from p2pfl.daemon.drops import DropLog
from p2pfl.identity import NodeIdentity
from p2pfl.learning.runtime import LearnerRuntime
from p2pfl.protocols import (
    EvaluationDone,
    Learner,
    Message,
    MessageError,
    MessageReceived,
    PeerDown,
    PeerUp,
    Start,
    TimerFired,
    TrainingDone,
    UseFeatures,
    decode_message,
)
from p2pfl.protocols import Event as ProtocolEvent
from p2pfl.wire import Envelope, EnvelopeVerifier, SequenceCounter, WireError, seal

log = logging.getLogger(__name__)

MESSAGE_STAGES = ("envelope", "update")
"""The DropLog stages of messages that arrived on a link and were rejected."""

StateDict = dict[str, Any]  # name -> torch.Tensor (torch is imported by the trainer, not here)


class Trainer(Protocol):
    """Runs torch work off the event loop (a worker thread behind a CapacityLimiter)."""

    async def train(self, weights: StateDict, epochs: float) -> tuple[StateDict, Any]:
        """Train a copy of ``weights``; return it and a report with ``samples``/``loss``."""
        ...

    async def evaluate(self, weights: StateDict) -> dict[str, float]: ...


class MessageSink(Protocol):
    """The transport as the driver uses it."""

    async def send(self, peer: str, data: bytes) -> None: ...


@dataclass
class PeerState:
    node_id: str
    state: str = "connected"
    since: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    last_seen: float | None = None


@dataclass
class NodeState:
    """What the node is doing; written by the driver, read by status, metrics and checkpoints."""

    model: StateDict | None = None
    round: int = 0
    round_offset: int = 0
    """Rounds done before the last restart (from the checkpoint)."""
    model_updated_at: float | None = None
    last_loss: float | None = None
    metric_name: str = "accuracy"
    metric_value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Every figure of the last evaluation (the primary one is also ``metric_value``)."""
    training_state: str = "starting"
    peers: dict[str, PeerState] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    training_seconds: float = 0.0
    protocol_seconds: float = 0.0
    """Time spent encoding, sealing, verifying and decoding messages (worker threads)."""
    samples_trained: int = 0
    energy_joules: float = 0.0
    history: list[tuple[float, int, float | None, float | None]] = field(default_factory=list)
    """(unix time, round, loss, metric) after every evaluation: the node's learning curve."""
    changed: trio.Event = field(default_factory=trio.Event)

    def mark_changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def rejected_messages(drops: DropLog) -> dict[str, int]:
    """Messages rejected (stages ``envelope`` and ``update``), by reason, from ``drops``."""
    out: Counter[str] = Counter()
    for (stage, reason), n in drops.totals.items():
        if stage in MESSAGE_STAGES:
            out[reason] += n
    return dict(out)


def rejected_from(drops: DropLog, peer: str) -> int:
    """Messages from ``peer`` rejected (stages ``envelope`` and ``update``), from ``drops``."""
    totals = drops.peer_totals(peer)
    return sum(totals.get(stage, 0) for stage in MESSAGE_STAGES)


class SideChannel(Protocol):
    """Daemon messages that are not the learning protocol's (e.g. revocation lists).

    Frames of ``kinds`` are verified like every other, then handed to ``received`` with their
    envelope kind instead of the machine; ``peer_up`` hears of every link up. Send with
    ``ProtocolDriver.send_side``.
    """

    kinds: frozenset[str]

    def peer_up(self, peer: str) -> None: ...
    def received(self, peer: str, kind: str, body: Any) -> None: ...


class SideChannels:
    """Several side channels behind the driver's one: their kinds united (they must not share a
    kind), every link up told to each, and each message handed to the channel of its kind."""

    def __init__(self, *channels: SideChannel) -> None:
        self._by_kind: dict[str, SideChannel] = {}
        for channel in channels:
            for kind in channel.kinds:
                if kind in self._by_kind:
                    raise ValueError(f"two side channels take {kind!r}")
                self._by_kind[kind] = channel
        self._channels = channels
        self.kinds = frozenset(self._by_kind)

    def peer_up(self, peer: str) -> None:
        for channel in self._channels:
            channel.peer_up(peer)

    def received(self, peer: str, kind: str, body: Any) -> None:
        self._by_kind[kind].received(peer, kind, body)


class FeatureSink(Protocol):
    """Graph tasks: stores the halo readings an owner sent (``UseFeatures``) with the data."""

    def use(self, peer: str, sensors: tuple[int, ...], data: bytes) -> None: ...


class DriverObserver(Protocol):
    """Hooks for metrics (all optional in effect: the default implementation does nothing)."""

    def on_bytes(self, received: int, sent: int) -> None: ...
    def on_trained(self, report: Any, wall_s: float) -> None: ...
    def on_round(self, state: NodeState) -> None: ...


class _NoObserver:
    def on_bytes(self, received: int, sent: int) -> None:
        pass

    def on_trained(self, report: Any, wall_s: float) -> None:
        pass

    def on_round(self, state: NodeState) -> None:
        pass


def _payload_bytes(message: Any) -> int:
    """Raw size of the tensors a message carries (0 for messages without weights)."""
    weights = getattr(message, "weights", None)
    if not isinstance(weights, dict):
        return 0
    return sum(int(t.numel()) * int(t.element_size()) for t in weights.values())


@dataclass(frozen=True, slots=True)
class _Evaluated:
    metrics: Mapping[str, float]
    round: int


class _DaemonHost:
    """The daemon as the runtime's host: sends and training in the driver's nursery,
    evaluation in the background (its result comes back as an event), drops in the DropLog."""

    def __init__(self, driver: ProtocolDriver) -> None:
        self.driver = driver

    def _nursery(self) -> trio.Nursery:
        assert self.driver._nursery is not None
        return self.driver._nursery

    def send(self, peer: str, message: Message[StateDict]) -> None:
        self._nursery().start_soon(self.driver._send, peer, message)

    def train(self, weights: StateDict, budget: float) -> None:
        self.driver.state.training_state = "training"
        self._nursery().start_soon(self.driver._train, weights, budget)

    def evaluate(self, weights: StateDict) -> None:
        self.driver._schedule_evaluation()  # of the adopted model; EvaluationDone comes later

    def adopt(self, weights: StateDict) -> None:
        driver = self.driver
        state = driver.state
        state.model = weights
        state.model_updated_at = time.time()
        state.round = state.round_offset + driver.machine.rounds
        driver.observer.on_round(state)
        if not driver.evaluate_on_request:
            driver._schedule_evaluation()
        state.mark_changed()

    def penalize(self, peer: str, reason: str) -> None:
        self.driver.drops.count("update", f"penalized_{reason}", peer)
        log.warning(
            "peer penalized: its updates keep failing validation",
            extra={"peer": peer, "reason": reason},
        )

    def use_features(self, action: UseFeatures) -> None:
        self.driver.features_received(action)

    def metric(self, name: str, value: float) -> None:
        log.debug("protocol metric", extra={"name": name, "value": value})

    def log(self, level: str, message: str) -> None:
        number = logging.getLevelName(level.upper())
        log.log(number if isinstance(number, int) else logging.INFO, message)

    def dropped(self, reason: str, count: int, peer: str | None, *, local: bool) -> None:
        # What the machine dropped while handling a message came from that message's sender;
        # its own bookkeeping (stale models, no peer to send to) is not a rejection.
        if not local:
            self.driver.drops.count("update", reason, peer, n=count)

    def deadline(self, at: float | None) -> None:
        pass  # the driver's loop reads next_deadline() after every event


class ProtocolDriver:
    def __init__(
        self,
        machine: Learner[StateDict],
        *,
        identity: NodeIdentity,
        sink: MessageSink,
        trainer: Trainer,
        encode_weights: Callable[[str, StateDict], bytes],
        decode_weights: Callable[[str, bytes], StateDict],
        state: NodeState,
        verifier: EnvelopeVerifier,
        observer: DriverObserver | None = None,
        drops: DropLog | None = None,
        primary_metric: str = "accuracy",
        inline_bytes: int = 1 << 20,
        start_peers: int = 0,
        start_timeout_s: float = 30.0,
        side_channel: SideChannel | None = None,
        features: FeatureSink | None = None,
        restart_link: Callable[[str], None] | None = None,
    ) -> None:
        self.machine = machine
        self.identity = identity
        self.sink = sink
        self.trainer = trainer
        self.encode_weights = encode_weights
        self.decode_weights = decode_weights
        """Per link (peer, ...): the setup's codec (``learning.codecs.LinkCodecs``, the virtual
        engine's too); ``restart_link(peer)`` starts a link over (a new session, a failed send)."""
        self.restart_link = restart_link or (lambda peer: None)
        self.state = state
        self.verifier = verifier
        self.observer: DriverObserver = observer or _NoObserver()
        self.drops = drops if drops is not None else DropLog()
        """Where every rejection is counted, once (the node's, shared with the transport)."""
        self.primary_metric = primary_metric
        self.inline_bytes = inline_bytes
        """Messages up to this size are encoded/verified in the event loop: a worker-thread hop
        cost 10x the work itself for a 68 KiB model (GIL contention with training)."""
        self.state.metric_name = primary_metric
        self.start_peers = start_peers
        """Hand the machine ``Start`` only once this many peers are up (or after
        ``start_timeout_s``), whatever the protocol: FedAvg's election then sees everyone who
        came up together, and server-free's first round expects every peer's model."""
        self.start_timeout_s = start_timeout_s
        self.side_channel = side_channel
        self.features = features
        """Graph tasks: where accepted halo readings go (``p2pfl.learning.features.HaloStore``)."""
        self._seq = SequenceCounter(time.time())
        self._send_locks: dict[str, trio.Lock] = {}
        self._inbox_send, self._inbox = trio.open_memory_channel[Any](math.inf)
        self._evaluating = False
        self._evaluate_again = False
        self._nursery: trio.Nursery | None = None
        self.runtime = LearnerRuntime(machine, _DaemonHost(self), trio.current_time)
        """The action interpreter the virtual engine runs too (``p2pfl.learning.runtime``)."""
        # With the machine's evaluate_every set, evaluate when it asks; else after every Adopt.
        every = getattr(getattr(machine, "config", None), "evaluate_every", 0)
        self.evaluate_on_request = isinstance(every, int) and every > 0

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self, transport_events: trio.abc.ReceiveChannel[Any]) -> None:
        """Drive the machine until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_loop, transport_events)
            self.state.training_state = "idle"
            self.state.model = self.machine.model
            deferred = await self._await_start_peers()
            await self._handle(Start())
            for early in deferred:
                await self._dispatch(early)
            while True:
                deadline = self.machine.next_deadline()
                event: Any = None
                with trio.move_on_at(deadline if deadline is not None else math.inf):
                    event = await self._inbox.receive()
                await self._dispatch(event)

    async def _dispatch(self, event: Any) -> None:
        if event is None:
            await self._handle(TimerFired())
        elif isinstance(event, _Evaluated):
            self._take_evaluation(event)
            if self.evaluate_on_request:  # the machine asked for it: its answer goes back in
                await self._handle(EvaluationDone(dict(event.metrics)))
        else:
            await self._handle(event)

    async def _await_start_peers(self) -> list[Any]:
        """Wait for ``start_peers`` peers (peer events reach the machine before ``Start``).

        Everything else that arrives meanwhile is kept, in order, for after ``Start``.
        """
        if self.start_peers <= 0:
            return []
        live: set[str] = set()
        deferred: list[Any] = []
        self.state.training_state = "waiting for peers"
        with trio.move_on_after(self.start_timeout_s):
            while len(live) < self.start_peers:
                event = await self._inbox.receive()
                if isinstance(event, PeerUp | PeerDown):
                    if isinstance(event, PeerUp):
                        live.add(event.peer)
                    else:
                        live.discard(event.peer)
                    await self._handle(event)
                else:
                    deferred.append(event)
        log.info(
            "starting the protocol",
            extra={"peers": len(live), "wanted": self.start_peers},
        )
        self.state.training_state = "idle"
        return deferred

    async def _handle(self, event: ProtocolEvent[StateDict]) -> None:
        if isinstance(event, MessageReceived):
            try:
                self.runtime.handle(event)
            except Exception as exc:  # a peer's message must not end the node: contain it
                self.drops.count("update", f"error_{type(exc).__name__}", event.peer)
                log.exception("handling a message failed", extra={"peer": event.peer})
        else:
            self.runtime.handle(event)

    def features_received(self, action: UseFeatures) -> None:
        """Halo readings the machine accepted (the runtime's ``use_features`` hook).

        Owner, sensors and data were checked by the machine; they are stored with the node's data
        and used from the next training on.
        """
        log.info(
            "node features received",
            extra={"peer": action.peer, "sensors": len(action.sensors), "bytes": len(action.data)},
        )
        if self.features is not None:
            try:
                self.features.use(action.peer, action.sensors, action.data)
            except ValueError as exc:  # the machine checked it: counted, never fatal
                self.drops.count("update", "features_unusable", action.peer)
                log.warning("node features not used", extra={"error": str(exc)})

    # ---- receiving --------------------------------------------------------------------------

    async def _receive_loop(self, events: trio.abc.ReceiveChannel[Any]) -> None:
        """Turn transport events into protocol events, verifying and decoding on the way."""
        async for event in events:
            kind = type(event).__name__
            now = time.time()
            if kind == "PeerUp":
                self.state.peers[event.peer] = PeerState(event.peer, since=now, last_seen=now)
                self.restart_link(event.peer)
                log.info("peer up", extra={"peer": event.peer})
                if self.side_channel is not None:
                    self.side_channel.peer_up(event.peer)
                await self._inbox_send.send(PeerUp(event.peer))
            elif kind == "PeerDown":
                peer = self.state.peers.get(event.peer)
                if peer is not None:
                    peer.state = "down"
                log.info("peer down", extra={"peer": event.peer, "reason": event.reason})
                await self._inbox_send.send(PeerDown(event.peer))
            elif kind == "MessageReceived":
                message = await self._open(event.peer, event.data)
                if message is not None:
                    await self._inbox_send.send(MessageReceived(event.peer, message))
            self.state.mark_changed()

    async def _open(self, peer: str, frame: bytes) -> Message[StateDict] | None:
        state = self.state
        state.bytes_in += len(frame)
        self.observer.on_bytes(len(frame), 0)
        info = state.peers.get(peer)
        if info is not None:
            info.bytes_in += len(frame)
            info.last_seen = time.time()

        def verify_and_decode() -> Message[StateDict] | Envelope | tuple[str, str]:
            try:
                envelope = self.verifier.open(frame, now=time.time())
            except WireError as exc:
                return "envelope", exc.reason
            if envelope.sender_id != peer:
                return "envelope", "sender_mismatch"
            if self.side_channel is not None and envelope.kind in self.side_channel.kinds:
                return envelope
            try:
                return decode_message(
                    envelope.kind, envelope.body, lambda data: self.decode_weights(peer, data)
                )
            except MessageError as exc:
                return "update", exc.reason
            except Exception as exc:  # whatever a peer's bytes provoke: a counted drop
                return "update", f"error_{type(exc).__name__}"

        started = time.perf_counter()
        if len(frame) <= self.inline_bytes:
            result = verify_and_decode()  # well under a millisecond: no thread hop
        else:
            result = await trio.to_thread.run_sync(verify_and_decode)
        state.protocol_seconds += time.perf_counter() - started
        if isinstance(result, Envelope):
            assert self.side_channel is not None
            self.side_channel.received(peer, result.kind, result.body)
            return None
        if isinstance(result, tuple):
            stage, reason = result
            self.drops.count(stage, reason, peer)
            log.info("message rejected", extra={"peer": peer, "stage": stage, "reason": reason})
            return None
        return result

    # ---- sending ----------------------------------------------------------------------------

    async def send_side(self, peer: str, message: Any) -> None:
        """Seal and send a side-channel message (``KIND``, ``to_body``) in the peer's order."""
        await self._send(peer, message)

    async def _send(self, peer: str, message: Message[StateDict]) -> None:
        lock = self._send_locks.setdefault(peer, trio.Lock())
        # Addressed to the peer's key where the transport knows it, so a frame cannot be replayed
        # to another member of the federation (the verifier there checks the recipient).
        key_of = getattr(self.sink, "peer_public_key", None)
        recipient = key_of(peer) if key_of is not None else None
        async with lock:

            def encode_and_seal() -> bytes:
                body = message.to_body(lambda weights: self.encode_weights(peer, weights))
                return seal(
                    self.identity,
                    kind=message.KIND,
                    body=body,
                    seq=self._seq.next(),
                    now=time.time(),
                    recipient=recipient,
                )

            started = time.perf_counter()
            try:
                if _payload_bytes(message) <= self.inline_bytes:
                    frame = encode_and_seal()
                else:
                    frame = await trio.to_thread.run_sync(encode_and_seal)
            except ValueError as exc:
                # The codec cannot carry this model (fp16 past 65504, NaN or inf with a lossy
                # codec): not sent, counted; the virtual engine does the same.
                self.drops.count("link", "unencodable", peer)
                log.warning("model not sent", extra={"peer": peer, "error": str(exc)})
                return
            finally:
                self.state.protocol_seconds += time.perf_counter() - started
            try:
                await self.sink.send(peer, frame)
            except (ConnectionError, ValueError) as exc:
                # Our own message, dropped because the link is down, full or refuses its size.
                self.drops.count("link", "send_failed", peer)
                self.restart_link(peer)  # the peer never got it: the next model goes whole
                log.info("send failed", extra={"peer": peer, "error": str(exc)})
                return
        self.state.bytes_out += len(frame)
        self.observer.on_bytes(0, len(frame))
        info = self.state.peers.get(peer)
        if info is not None:
            info.bytes_out += len(frame)

    # ---- training and evaluation ------------------------------------------------------------

    async def _train(self, weights: StateDict, epochs: float) -> None:
        started = time.perf_counter()
        trained, report = await self.trainer.train(weights, epochs)
        wall = time.perf_counter() - started
        state = self.state
        state.training_state = "idle"
        state.last_loss = float(report.loss)
        state.training_seconds += wall
        state.samples_trained += int(report.samples)
        energy = getattr(report, "energy_j", None)
        if energy is not None:
            state.energy_joules += float(energy)
        self.observer.on_trained(report, wall)
        await self._inbox_send.send(TrainingDone(trained, report))

    def _schedule_evaluation(self) -> None:
        assert self._nursery is not None
        if self._evaluating:
            self._evaluate_again = True
            return
        self._evaluating = True
        self._nursery.start_soon(self._evaluate)

    async def _evaluate(self) -> None:
        while True:
            self._evaluate_again = False
            model, round_ = self.state.model, self.state.round
            if model is None:
                break
            metrics = await self.trainer.evaluate(model)
            await self._inbox_send.send(_Evaluated(metrics, round_))
            if not self._evaluate_again:
                break
        self._evaluating = False

    def _take_evaluation(self, evaluated: _Evaluated) -> None:
        state = self.state
        state.metrics = {k: float(v) for k, v in evaluated.metrics.items()}
        value = evaluated.metrics.get(self.primary_metric)
        if value is not None:
            state.metric_value = float(value)
        state.history.append((time.time(), evaluated.round, state.last_loss, state.metric_value))
        del state.history[:-10_000]
        self.observer.on_round(state)
        state.mark_changed()
        log.info(
            "evaluated",
            extra={
                "round": evaluated.round,
                self.primary_metric: state.metric_value,
                "loss": state.last_loss,
            },
        )
