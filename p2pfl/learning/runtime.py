"""One action interpreter: what a learner's actions mean, for the daemon and the virtual engine.

A protocol machine (``p2pfl.protocols``) answers every event with a list of actions.
:class:`LearnerRuntime` hands the event in, performs each action through a :class:`Host` (the
part that differs: how a message is sent, how training and evaluation run, the clock, timers),
feeds ``EvaluationDone`` back when an evaluation finishes, and reports what the machine dropped
while handling the event, attributed to the sender of the message that caused it. The daemon's
driver (``p2pfl.daemon.driver``) and the virtual engine (``p2pfl.sim.virtual``) both run it, so
an action means the same in both; an action the runtime does not know is a ``TypeError`` in both.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from p2pfl.protocols import (
    Adopt,
    Evaluate,
    EvaluationDone,
    Learner,
    Log,
    Message,
    MessageReceived,
    Metric,
    Penalize,
    Send,
    SetTimer,
    Train,
    UseFeatures,
)
from p2pfl.protocols import Event as ProtocolEvent

W = TypeVar("W")

LOCAL_DROPS = frozenset({"no_peer_to_send", "stale_model", "inbox_overflow"})
"""Machine drop reasons that are bookkeeping, not a peer's message being rejected."""


class Host(Protocol[W]):
    """What the runtime needs of the daemon or the engine running it."""

    def send(self, peer: str, message: Message[W]) -> None:
        """Send ``message`` to ``peer`` (encoding, sealing and loss are the host's)."""
        ...

    def train(self, weights: W, budget: float) -> None:
        """Start training a copy of ``weights``; hand ``TrainingDone`` in when it is done."""
        ...

    def evaluate(self, weights: W) -> Mapping[str, float] | None:
        """Evaluate the model: the figures at once (the runtime feeds them back as
        ``EvaluationDone``), or None when they come later (the host then hands
        ``EvaluationDone`` in itself)."""
        ...

    def adopt(self, weights: W) -> None:
        """``weights`` is now the node's model."""
        ...

    def penalize(self, peer: str, reason: str) -> None: ...

    def use_features(self, action: UseFeatures) -> None:
        """A graph task's halo readings arrived from ``action.peer`` (what is done with them is
        the host's: the daemon's feature handling, the engine's byte count)."""
        ...

    def metric(self, name: str, value: float) -> None: ...

    def log(self, level: str, message: str) -> None: ...

    def dropped(self, reason: str, count: int, peer: str | None, *, local: bool) -> None:
        """The machine dropped ``count`` inputs for ``reason`` while handling an event (``peer``:
        the sender of the message it was handling; ``local``: a :data:`LOCAL_DROPS` reason)."""
        ...

    def deadline(self, at: float | None) -> None:
        """The machine's next timer after an event (None: none); hand ``TimerFired`` in then."""
        ...


class LearnerRuntime(Generic[W]):
    """Runs one machine: events in, actions performed through ``host``."""

    def __init__(self, machine: Learner[W], host: Host[W], clock: Callable[[], float]) -> None:
        self.machine = machine
        self.host = host
        self.clock = clock
        self._drops: Counter[str] = Counter(machine.dropped)

    def handle(self, event: ProtocolEvent[W]) -> None:
        """Hand ``event`` in and perform what the machine answers (and any evaluation it asks
        for that finishes at once), then report its drops and its next deadline."""
        pending: deque[ProtocolEvent[W]] = deque([event])
        while pending:
            current = pending.popleft()
            actions = self.machine.handle(current, self.clock())
            for action in actions:
                self.perform(action, pending)
            self._count_drops(current.peer if isinstance(current, MessageReceived) else None)
        self.host.deadline(self.machine.next_deadline())

    def perform(self, action: Any, pending: deque[ProtocolEvent[W]]) -> None:
        host = self.host
        if isinstance(action, Send):
            host.send(action.peer, action.message)
        elif isinstance(action, Train):
            host.train(action.weights, action.budget)
        elif isinstance(action, Evaluate):
            metrics = host.evaluate(action.weights)
            if metrics is not None:
                pending.append(EvaluationDone(dict(metrics)))
        elif isinstance(action, Adopt):
            host.adopt(action.weights)
        elif isinstance(action, Penalize):
            host.penalize(action.peer, action.reason)
        elif isinstance(action, UseFeatures):
            host.use_features(action)
        elif isinstance(action, Metric):
            host.metric(action.name, action.value)
        elif isinstance(action, Log):
            host.log(action.level, action.message)
        elif isinstance(action, SetTimer):
            pass  # the host hears of the machine's next deadline after every event
        else:
            raise TypeError(f"unknown protocol action {action!r}")

    def _count_drops(self, peer: str | None) -> None:
        now = self.machine.dropped
        for reason, count in now.items():
            new = count - self._drops.get(reason, 0)
            if new > 0:
                self.host.dropped(reason, new, peer, local=reason in LOCAL_DROPS)
        self._drops = Counter(now)
