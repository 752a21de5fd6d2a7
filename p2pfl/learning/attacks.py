"""Insider attacks, for experiments and tests: an attacker is an honest learner whose sends lie.

An attacker is an admitted member: its messages are signed and well-formed, so nothing outside
the learning rules can stop them. :class:`AttackingLearner` wraps the protocol machine that
``learning.factory.make_learner`` made for the node: every event goes to the honest machine
(which trains, merges and keeps its own model as any node would), and the models and claims of
its outgoing messages are replaced by the attack's, so the daemon, the virtual engine and the
processes engine apply the same attack by wrapping the same factory's output. Label flipping
poisons the data instead (:func:`flip_labels`), applied where the node's data is loaded.

Kinds (``ATTACK_KINDS``), on each model the attacker sends (``w``: what the honest machine would
have sent; ``r``: the model its last training started from, the round's reference; ``H``: the
honest models it holds, i.e. ``w`` and the models it received lately from peers that are not
fellow attackers; deltas are taken from ``r``):

- ``sign-flip``: ``-magnitude * w`` (every weight negated).
- ``scale``: ``factor * w``.
- ``alie`` (A Little Is Enough, Baruch et al. 2019): ``r + mean(H - r) - z * std(H - r)``,
  coordinate-wise: a model inside the honest spread, shifted against it.
- ``ipm`` (Inner Product Manipulation, Xie et al. 2020): ``r - epsilon * mean(H - r)``: an update
  whose inner product with the honest mean update is negative.
- ``label-flip``: no change to what is sent; the training labels are ``classes - 1 - y``.
- ``inflation``: the honest model with its claim raised by ``lead``: a gossip age, a round.
- ``nan`` / ``inf``: every floating-point weight NaN / +inf.
- ``absent``: not an attack but its reference: the nodes are not there at all (they neither
  train nor send; the engines never start them), so a run is the honest-only federation.

``start`` (seconds after the machine's ``Start``) and ``start_round`` (the honest machine's
completed rounds) delay the attack; before both are reached the attacker is honest. Label flipping
poisons the data from the first training, so it takes neither.

Models are the drivers' handles: a torch state_dict (floating-point tensors are attacked, integer
buffers are kept), a numpy vector (the vectorized digits path) or a float (the unit tests).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic

import numpy as np

from p2pfl.protocols import (
    Action,
    GlobalModel,
    GossipModel,
    Learner,
    MessageReceived,
    RoundUpdate,
    Send,
    Start,
    Train,
)
from p2pfl.protocols._base import W
from p2pfl.protocols._messages import MAX_ROUND

ATTACK_KINDS = (
    "sign-flip",
    "scale",
    "alie",
    "ipm",
    "label-flip",
    "inflation",
    "nan",
    "inf",
    "absent",
)

RECENT_MODELS = 8
"""How many received honest models ALIE and IPM estimate the honest spread from."""


@dataclass(frozen=True, slots=True)
class Attack:
    """One attack: its kind, when it starts and the kind's parameters (others are ignored)."""

    kind: str
    start: float = 0.0
    """Seconds after the machine's ``Start`` before the attack begins."""
    start_round: int = 0
    """Completed rounds of the honest machine before the attack begins."""
    magnitude: float = 1.0
    """sign-flip: the sent model is ``-magnitude * w``."""
    factor: float = 100.0
    """scale: the sent model is ``factor * w``."""
    z: float = 1.0
    """alie: standard deviations the sent model lies from the honest mean."""
    epsilon: float = 0.5
    """ipm: the sent update is ``-epsilon`` times the honest mean update."""
    lead: int = 1000
    """inflation: added to every age or round the attacker claims."""

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"unknown attack kind {self.kind!r}; known: {', '.join(ATTACK_KINDS)}")
        if not 0 <= self.start < math.inf:
            raise ValueError(f"start must be finite and >= 0, got {self.start}")
        if self.start_round < 0:
            raise ValueError(f"start_round must be >= 0, got {self.start_round}")
        if self.kind in ("label-flip", "absent") and (self.start or self.start_round):
            raise ValueError(f"{self.kind} applies from the first training; no start")
        if self.lead < 1:
            raise ValueError(f"lead must be at least 1, got {self.lead}")
        for name in ("magnitude", "factor", "z", "epsilon"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")

    @property
    def tampers(self) -> bool:
        """Whether the attack changes what is sent (label-flip changes the data instead)."""
        return self.kind not in ("label-flip", "absent")


# -- arithmetic on model handles ----------------------------------------------------------


def _combine(models: Sequence[Any], coefs: Sequence[float]) -> Any:
    """``sum(c * m)`` over model handles of one shape (non-float tensors: the first's)."""
    first = models[0]
    if isinstance(first, Mapping):
        out = {}
        for key, value in first.items():
            if not value.is_floating_point():
                out[key] = value.clone()
                continue
            acc = value.detach().double() * coefs[0]
            for model, c in zip(models[1:], coefs[1:], strict=True):
                acc = acc + model[key].detach().double() * c
            out[key] = acc.to(value.dtype)
        return out
    acc = first * coefs[0]
    for model, c in zip(models[1:], coefs[1:], strict=True):
        acc = acc + model * c
    return acc


def _spread(deltas: Sequence[Any]) -> tuple[Any, Any]:
    """Coordinate-wise mean and (population) standard deviation of equally shaped handles."""
    n = len(deltas)
    mean = _combine(deltas, [1.0 / n] * n)
    first = deltas[0]
    if isinstance(first, Mapping):
        std = {}
        for key, value in first.items():
            if not value.is_floating_point():
                std[key] = value.clone()
                continue
            var = sum((d[key].double() - mean[key].double()) ** 2 for d in deltas) / n
            std[key] = var.sqrt().to(value.dtype)
        return mean, std
    var = sum((d - mean) ** 2 for d in deltas) / n
    return mean, var**0.5


def _filled(model: Any, value: float) -> Any:
    """``model`` with every floating-point weight set to ``value``."""
    if isinstance(model, Mapping):
        return {
            k: (t.detach().clone().fill_(value) if t.is_floating_point() else t.clone())
            for k, t in model.items()
        }
    return model * 0 + value


def attacked_model(attack: Attack, sent: Any, reference: Any, honest: Sequence[Any]) -> Any:
    """The model the attacker sends instead of ``sent`` (see the module for each kind).

    ``reference``: the model the attacker's last training started from; ``honest``: the honest
    models it holds (``sent`` included).
    """
    # A model that already diverged (plain averaging under attack) overflows to inf here: that
    # is the attack's effect, not an error of ours, so numpy is told not to warn.
    with np.errstate(all="ignore"):
        return _attacked(attack, sent, reference, honest)


def _attacked(attack: Attack, sent: Any, reference: Any, honest: Sequence[Any]) -> Any:
    kind = attack.kind
    if kind == "sign-flip":
        return _combine([sent], [-attack.magnitude])
    if kind == "scale":
        return _combine([sent], [attack.factor])
    if kind == "nan":
        return _filled(sent, math.nan)
    if kind == "inf":
        return _filled(sent, math.inf)
    if kind in ("alie", "ipm"):
        deltas = [_combine([h, reference], [1.0, -1.0]) for h in honest]
        mean, std = _spread(deltas)
        if kind == "alie":
            return _combine([reference, mean, std], [1.0, 1.0, -attack.z])
        return _combine([reference, mean], [1.0, -attack.epsilon])
    return sent  # inflation, label-flip: the honest model


def _is_model_message(message: object) -> bool:
    return isinstance(message, GossipModel | RoundUpdate | GlobalModel)


class AttackingLearner(Learner[W], Generic[W]):
    """The honest machine ``inner``, with the models and claims it sends replaced by ``attack``'s.

    ``colluders``: the other attackers' ids; their models are not taken as honest ones. Everything
    but the outgoing messages is the honest machine's: its model, rounds, drops, timers.
    ``tampered`` counts the messages changed.
    """

    def __init__(
        self, inner: Learner[W], attack: Attack, *, colluders: Collection[str] = ()
    ) -> None:
        if attack.kind == "absent":
            raise ValueError("an absent node runs no machine; the engines do not start it")
        # The base class's state belongs to ``inner``; this wrapper keeps only its own.
        self._inner = inner
        self.attack = attack
        self._colluders = frozenset(colluders)
        self._started_at: float | None = None
        self._reference: W = inner.model
        self._recent: deque[W] = deque(maxlen=RECENT_MODELS)
        self._last: tuple[W, W] | None = None  # (honest model, what was sent instead)
        self.tampered = 0

    # The learner surface the drivers read, all the honest machine's.
    node_id = property(lambda self: self._inner.node_id)
    finished = property(lambda self: self._inner.finished)
    dropped = property(lambda self: self._inner.dropped)
    bytes_features_sent = property(lambda self: self._inner.bytes_features_sent)
    bytes_features_received = property(lambda self: self._inner.bytes_features_received)

    @property
    def inner(self) -> Learner[W]:
        return self._inner

    @property
    def model(self) -> W:
        return self._inner.model

    @property
    def peers(self) -> frozenset[str]:
        return self._inner.peers

    @property
    def rounds(self) -> int:
        return self._inner.rounds

    def next_deadline(self) -> float | None:
        return self._inner.next_deadline()

    def clip_radius(self) -> float | None:
        return self._inner.clip_radius()

    def __getattr__(self, name: str) -> Any:
        # Protocol-specific state a driver may read (gossip's age, FedAvg's round, aggregator).
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def active(self, now: float) -> bool:
        """Whether the attack has begun (always False for label-flip: it sends honestly)."""
        return (
            self.attack.tampers
            and self._started_at is not None
            and now - self._started_at >= self.attack.start
            and self._inner.rounds >= self.attack.start_round
        )

    def handle(self, event: Any, now: float) -> list[Action[W]]:
        if isinstance(event, Start):
            self._started_at = now
        if (
            isinstance(event, MessageReceived)
            and event.peer not in self._colluders
            and _is_model_message(event.message)
        ):
            self._recent.append(event.message.weights)  # type: ignore[union-attr]
        actions = self._inner.handle(event, now)
        for action in actions:
            if isinstance(action, Train):
                self._reference = action.weights
        if not self.active(now):
            return actions
        return [self._tamper(a) if isinstance(a, Send) else a for a in actions]

    def _tamper(self, send: Send[W]) -> Send[W]:
        message = send.message
        if not isinstance(message, GossipModel | RoundUpdate | GlobalModel):
            return send
        honest = message.weights
        if self._last is not None and self._last[0] is honest:
            weights = self._last[1]  # one model to several peers: one lie, computed once
        else:
            weights = attacked_model(self.attack, honest, self._reference, [*self._recent, honest])
            self._last = (honest, weights)
        changes: dict[str, Any] = {"weights": weights}
        if self.attack.kind == "inflation":
            if isinstance(message, GossipModel):
                changes["age"] = min(message.age + self.attack.lead, MAX_ROUND)
            else:
                changes["round"] = min(message.round + self.attack.lead, MAX_ROUND)
        self.tampered += 1
        return Send(send.peer, dataclasses.replace(message, **changes))


def flip_labels(data: Any) -> Any:
    """A classification node's data with every training label ``y`` made ``classes - 1 - y``
    (``classes``: from the test labels); anything else raises ``ValueError``."""
    from p2pfl.ml.task import ClassificationData
    from p2pfl.ml.train import TensorSamples

    if not isinstance(data, ClassificationData):
        raise ValueError("label-flip needs a classification task (digits)")
    x, y = data.train_set.tensors[:2]
    classes = int(data.test_set.tensors[1].max()) + 1
    return ClassificationData(TensorSamples(x, classes - 1 - y), data.test_set)
