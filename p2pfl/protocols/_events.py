"""Events: everything that can happen to a learner, handed in by its driver.

A driver (the daemon's trio loop, the virtual-time engine, or a unit test) turns the outside
world into these values and calls ``machine.handle(event, now)``. Events are immutable values;
they hold no I/O objects. ``W`` is the driver's weights handle: the machines never look inside it.

Invariants the driver keeps:
- ``Start`` is handed in exactly once, before anything but ``PeerUp``/``PeerDown``.
- ``TrainingDone`` answers exactly one earlier ``Train`` action, ``EvaluationDone`` one
  ``Evaluate``; a machine never has more than one ``Train`` outstanding.
- ``TimerFired`` may come late or spuriously: the machine checks its own deadlines against ``now``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeAlias, TypeVar, Union

from ._messages import Message

W = TypeVar("W")


class TrainingReport(Protocol):
    """What a learner reads from a training report (p2pfl.ml's ``TrainReport`` fits)."""

    @property
    def samples(self) -> int: ...

    @property
    def loss(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Start:
    """Begin learning. Hand in the peers already known (``PeerUp``) first, if any."""


@dataclass(frozen=True, slots=True)
class PeerUp:
    """The transport has a live, authenticated connection to ``peer`` (a node id)."""

    peer: str


@dataclass(frozen=True, slots=True)
class PeerDown:
    """The connection to ``peer`` is gone (heartbeats stopped, or it left)."""

    peer: str


@dataclass(frozen=True, slots=True)
class MessageReceived(Generic[W]):
    """A verified, decoded message from ``peer`` (signature and trust are the driver's job)."""

    peer: str
    message: Message[W]


@dataclass(frozen=True, slots=True)
class TimerFired:
    """The deadline last announced by ``SetTimer`` (or ``next_deadline()``) has passed."""


@dataclass(frozen=True, slots=True)
class TrainingDone(Generic[W]):
    """The ``Train`` action finished: ``weights`` is the trained model."""

    weights: W
    report: TrainingReport


@dataclass(frozen=True, slots=True)
class EvaluationDone:
    """The ``Evaluate`` action finished with these metrics (name -> value)."""

    metrics: Mapping[str, float]


Event: TypeAlias = Union[
    Start, PeerUp, PeerDown, "MessageReceived[W]", TimerFired, "TrainingDone[W]", EvaluationDone
]
