"""Actions: what a learner asks its driver to do, returned by ``handle``.

The driver performs actions in list order. They are immutable values; weights are the driver's
opaque handles, passed back exactly as the driver handed them in (or as ``ModelOps`` made them).

Invariants the machines keep:
- Every change of a machine's model is announced by exactly one ``Adopt``.
- At most one ``Train`` is outstanding; the next comes only after its ``TrainingDone``.
- ``SetTimer(at)`` appears (last in the list) whenever ``next_deadline()`` changed during the
  call; ``SetTimer(None)`` cancels. A driver may instead poll ``next_deadline()`` after each call.
- ``Penalize`` is emitted once per peer, when its rejected updates reach the strike limit; the
  machine ignores that peer from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar, Union

from ._messages import Message

W = TypeVar("W")


@dataclass(frozen=True, slots=True)
class Send(Generic[W]):
    """Send ``message`` to ``peer`` (sign, encode, transmit: all the driver's)."""

    peer: str
    message: Message[W]


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Hand in ``TimerFired`` at virtual/real time ``at``; ``None`` cancels the timer."""

    at: float | None


@dataclass(frozen=True, slots=True)
class Train(Generic[W]):
    """Train a copy of ``weights`` locally for ``budget`` epochs, then hand in ``TrainingDone``."""

    weights: W
    budget: float


@dataclass(frozen=True, slots=True)
class Evaluate(Generic[W]):
    """Evaluate ``weights`` on the local test data, then hand in ``EvaluationDone``."""

    weights: W


@dataclass(frozen=True, slots=True)
class Adopt(Generic[W]):
    """``weights`` is now this node's model (serve it, checkpoint it, evaluate it)."""

    weights: W


@dataclass(frozen=True, slots=True)
class Penalize:
    """``peer`` keeps sending updates that fail validation: stop trusting it."""

    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class UseFeatures:
    """Readings of ``sensors`` arrived from their owner ``peer``: hand them to the task."""

    peer: str
    sensors: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class Metric:
    """A measurement for the driver's metrics sink (counters, per-round figures)."""

    name: str
    value: float


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the driver's log."""

    message: str
    level: str = "info"


Action: TypeAlias = Union[
    "Send[W]",
    SetTimer,
    "Train[W]",
    "Evaluate[W]",
    "Adopt[W]",
    Penalize,
    UseFeatures,
    Metric,
    Log,
]
