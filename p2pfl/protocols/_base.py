"""The part every learner shares: time, timers, peers, offenders, feature exchange, training slot.

Invariants:
- ``now`` never goes backwards between calls (a driver bug: ``ValueError``).
- Timers are named deadlines; ``next_deadline()`` is the earliest; ``TimerFired`` runs every
  deadline ``<= now`` in (time, name) order, so a late or spurious timer is harmless.
- At most one ``Train`` is outstanding (``_training``); a ``TrainingDone`` without one is a
  driver bug (``ValueError``).
- A peer is in ``peers`` between its ``PeerUp`` and ``PeerDown``, never this node, never a
  penalized peer. Messages from penalized peers are dropped and counted.
- Remote input never raises: a bad message is dropped with a reason counted in ``dropped``;
  an update that fails validation is also a strike against its sender, and at
  ``strikes_to_penalize`` strikes the machine emits ``Penalize`` once and ignores the peer.
- Learning starts only when the feature plan is satisfied (every needed reply, or its timeout).
- A training result that fails validation against what was trained (NaN/inf, wrong shape) is
  counted (``own_training_invalid:<reason>``) and replaced by the model trained on, so no
  non-finite model is ever adopted, sent or merged.
- Claims cannot buy influence: where a merge weighs models by stated sample counts (server-free
  and FedAvg, with a rule of ``WEIGHTED_RULES``) each count is capped at ``max_sample_ratio``
  times the lower median of the counts in the same merge (counted as ``samples_capped``); ages
  and rounds are bounded by each machine (see their docstrings).
- Aggregation is robust by default. With rule "clip" (self-centred clipping) each merged
  model's difference from this node's model is clipped to a radius: ``clip_radius`` if set,
  else ``clip_scale`` times the median of recent distances (this node's own training steps and
  the merged models' distances, each capped at the radius in force), so a minority of far-away
  models can neither move the model by more than the radius nor grow it. No history yet: the
  radius is 0 (peers' models wait for this node's first training to set the scale).
  ``clip_iterations`` > 1 repeats the clipping around each step's result (centred clipping,
  Karimireddy et al. 2021); each step moves the model by at most the radius.
- With a robust rule (every rule but plain "mean": ``OUTLIER_RULES``) and a finite
  ``clip_outlier``, a received model farther from this node's model than ``clip_outlier`` x the
  median distance of the recent received models is rejected on arrival (``clip_outlier``, a
  strike): the limit follows what peers send, not this node's own steps, so a node that drifted
  from every peer still merges them, while a minority that keeps sending far-away models (a
  negated or scaled model) is dropped and, after ``strikes_to_penalize`` such models, penalized.
  What stays within the limit goes to the rule (clipped, trimmed, ...). Plain "mean" rejects
  nothing: it is the unbounded reference, only run when a configuration asks for it.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

from ._actions import (
    Action,
    Evaluate,
    Log,
    Metric,
    Penalize,
    Send,
    SetTimer,
    Train,
    UseFeatures,
)
from ._events import (
    EvaluationDone,
    Event,
    MessageReceived,
    PeerDown,
    PeerUp,
    Start,
    TimerFired,
    TrainingDone,
    TrainingReport,
)
from ._messages import FeatureReply, FeatureRequest, Message
from ._ops import FeaturePlan, ModelOps

W = TypeVar("W")

_FEATURES_TIMER = "features"


@dataclass(frozen=True, slots=True)
class LearnerSettings:
    """What every learner's config has; GossipConfig, ServerFreeConfig, FedAvgConfig extend it."""

    budget: float = 1.0
    """Local training per round (gossip: per tick), in epochs."""
    aggregation: str = "clip"
    """Name of the aggregation rule, one of ``ModelOps.rules``: "clip" (self-centred clipping,
    every protocol's default), "krum", "multikrum", "median", "trimmed_mean", or "mean" (plain
    weighted mean: unbounded, only if asked for)."""
    clip_radius: float | None = None
    """"clip": the radius; None adapts it (``clip_scale`` x median of recent distances)."""
    clip_scale: float = 2.0
    """"clip" with an adaptive radius: the radius as a multiple of the median recent distance."""
    clip_window: int = 32
    """"clip" with an adaptive radius: how many recent distances the median is taken over; every
    rule of ``OUTLIER_RULES``: how many received distances ``clip_outlier``'s median is taken
    over."""
    clip_iterations: int = 1
    """"clip": clipping steps, each around the previous one's result (centred clipping, CClip);
    1 clips around this node's model only."""
    clip_outlier: float = 4.0
    """Every rule but "mean" (``OUTLIER_RULES``; the name is from when "clip" alone read it): a
    received model farther from this node's model than this many times the median
    distance of the last ``clip_window`` received models (itself included) is rejected on
    arrival as an outlier (counted ``clip_outlier``, a strike); inf: never.
    Clipping alone bounds each far model's pull to the radius, but a same-direction minority
    adds up: three of 16 digits nodes sending -w cost gossip 10 points, server-free 3.1 and
    FedAvg 2.4 over 3 seeds. Honest models were almost never 4 x the median received distance
    away (0-2 of about 3,200 per gossip run), negated and scaled ones almost always
    (simulations/results/robustness-byzantine)."""
    krum_f: int | None = None
    """"krum"/"multikrum": inputs assumed Byzantine; None: the most that n >= 2f + 3 allows."""
    krum_m: int | None = None
    """"multikrum": how many of the best-scored inputs are averaged; None: n - krum_f."""
    trim_fraction: float = 0.2
    """"trimmed_mean": the fraction of largest and of smallest values dropped per coordinate."""
    max_rounds: int | None = None
    strikes_to_penalize: int = 3
    """Rejected updates from one peer before it is penalized."""
    evaluate_every: int = 0
    """Emit ``Evaluate(model)`` after every this many completed rounds; 0 = never."""


@dataclass(frozen=True, slots=True)
class SampleWeightedSettings(LearnerSettings):
    """What a protocol that weighs merged models by their stated sample counts adds: server-free
    and FedAvg (gossip weighs by age)."""

    max_sample_ratio: float = 4.0
    """A stated sample count weighs at most this many times the merge's lower median count;
    read by the rules that weigh (``WEIGHTED_RULES``)."""


WEIGHTED_RULES = ("clip", "multikrum", "mean")
"""The rules whose merge weighs its inputs; "median", "trimmed_mean" and "krum" count every
input alike, so a sample count (and its cap) changes nothing there."""

OUTLIER_RULES = ("clip", "trimmed_mean", "median", "krum", "multikrum")
"""The rules that reject a received model as an outlier (``clip_outlier``) before merging:
every robust rule, so that a far-away minority is dropped and struck whatever merges the rest."""

_RULE_DEFAULTS = {
    f.name: f.default
    for f in fields(LearnerSettings)
    if f.name
    in (
        "clip_radius",
        "clip_scale",
        "clip_window",
        "clip_iterations",
        "clip_outlier",
        "krum_f",
        "krum_m",
        "trim_fraction",
    )
}
"""The rule parameters and their defaults (what an ops object without params gets)."""


def _check_rule_settings(config: LearnerSettings) -> None:
    """Our own misuse raises: parameters outside what their rule can use."""
    if config.clip_radius is not None and not 0 <= config.clip_radius < math.inf:
        raise ValueError(f"clip_radius must be finite and >= 0, got {config.clip_radius}")
    if not 0 < config.clip_scale < math.inf:
        raise ValueError(f"clip_scale must be positive, got {config.clip_scale}")
    if config.clip_window < 1:
        raise ValueError(f"clip_window must be at least 1, got {config.clip_window}")
    if config.clip_iterations < 1:
        raise ValueError(f"clip_iterations must be at least 1, got {config.clip_iterations}")
    if not config.clip_outlier >= 1:
        raise ValueError(f"clip_outlier must be >= 1 (radii), got {config.clip_outlier}")
    if config.krum_f is not None and config.krum_f < 0:
        raise ValueError(f"krum_f must be >= 0, got {config.krum_f}")
    if config.krum_m is not None and config.krum_m < 1:
        raise ValueError(f"krum_m must be at least 1, got {config.krum_m}")
    if not 0 <= config.trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {config.trim_fraction}")
    if isinstance(config, SampleWeightedSettings) and not config.max_sample_ratio >= 1:
        raise ValueError(f"max_sample_ratio must be at least 1, got {config.max_sample_ratio}")


class Learner(Generic[W]):
    """Base class of the learning machines; subclasses implement the ``_on_*`` hooks."""

    def __init__(
        self,
        node_id: str,
        weights: W,
        ops: ModelOps[W],
        rng: random.Random,
        config: LearnerSettings,
        *,
        features: FeaturePlan | None,
    ) -> None:
        aggregation, budget, max_rounds = config.aggregation, config.budget, config.max_rounds
        if aggregation not in ops.rules:
            raise ValueError(
                f"unknown aggregation rule {aggregation!r}; known: {', '.join(sorted(ops.rules))}"
            )
        _check_rule_settings(config)
        if budget <= 0:
            raise ValueError(f"training budget must be positive, got {budget}")
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
        self.node_id = node_id
        self._model = weights
        self._ops = ops
        self._rng = rng
        self._budget = budget
        self._aggregation = aggregation
        self._max_rounds = max_rounds
        self._strikes_to_penalize = config.strikes_to_penalize
        self._evaluate_every = config.evaluate_every
        self._settings = config
        # An ops object without distance() predates rule parameters: it gets rule names only,
        # and a parameter set away from its default is refused rather than ignored.
        self._ops_takes_params = callable(getattr(ops, "distance", None))
        if not self._ops_takes_params:
            defaults = {f.name: f.default for f in fields(config) if f.name in _RULE_DEFAULTS}
            changed = sorted(
                name for name, default in defaults.items() if getattr(config, name) != default
            )
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} set, but this driver's ModelOps has no distance() "
                    "and takes no rule parameters; give it p2pfl.ml.StateDictOps"
                )
        self._distances: deque[float] = deque(maxlen=config.clip_window)
        self._received: deque[float] = deque(maxlen=config.clip_window)
        """Distances of the last received models from their merge's centre (clip_outlier)."""
        self._train_input: W | None = None
        self._plan = features or FeaturePlan()
        self._now = -math.inf
        self._deadlines: dict[str, float] = {}
        self._peers: set[str] = set()
        self._penalized: set[str] = set()
        self._strikes: Counter[str] = Counter()
        self._features_pending = set(self._plan.needs)
        self._started = False
        self._learning = False
        self._training = False
        self.finished = False
        self.dropped: Counter[str] = Counter()
        """Remote input dropped, by reason slug (the machine's only error channel for peers)."""
        self.bytes_features_sent = 0
        self.bytes_features_received = 0

    # -- public surface -------------------------------------------------------------------

    @property
    def model(self) -> W:
        """The node's current model (the last one announced by ``Adopt``, or the initial one)."""
        return self._model

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    @property
    def rounds(self) -> int:
        """Completed rounds (gossip: completed local trainings)."""
        raise NotImplementedError

    @property
    def learning(self) -> bool:
        """Whether learning has begun (the feature plan was satisfied or its deadline passed)."""
        return self._learning

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def handle(self, event: Event[W], now: float) -> list[Action[W]]:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now
        before = self.next_deadline()
        actions = self._dispatch(event, now)
        after = self.next_deadline()
        if after != before:
            actions.append(SetTimer(after))
        return actions

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self, event: Event[W], now: float) -> list[Action[W]]:
        if isinstance(event, MessageReceived):
            return self._on_received(event.peer, event.message, now)
        if isinstance(event, TimerFired):
            return self._fire_timers(now)
        if isinstance(event, TrainingDone):
            if not self._training:
                raise ValueError("TrainingDone without an outstanding Train")
            self._training = False
            trained = event.weights
            if self._train_input is not None:
                # Against itself: what any model must be (finite, well-formed), not the distance
                # bound that peers' updates get (a long local training may exceed it honestly).
                reason = self._ops.validate(trained, trained)
                if reason is not None:
                    # Training diverged (e.g. from a poisoned model): keep what was trained on.
                    self.dropped[f"own_training_invalid:{reason}"] += 1
                    trained = self._train_input
            self._note_training_step(trained)
            return self._on_trained(trained, event.report, now)
        if isinstance(event, PeerUp):
            return self._peer_up(event.peer, now)
        if isinstance(event, PeerDown):
            if event.peer not in self._peers:
                return []
            self._peers.discard(event.peer)
            return self._on_peer_down(event.peer, now)
        if isinstance(event, Start):
            return self._start(now)
        if isinstance(event, EvaluationDone):
            return [Metric(f"eval_{k}", float(v)) for k, v in sorted(event.metrics.items())]
        raise TypeError(f"not a protocol event: {event!r}")

    def _start(self, now: float) -> list[Action[W]]:
        if self._started:
            raise ValueError("Start handed in twice")
        self._started = True
        actions: list[Action[W]] = [
            Send(peer, FeatureRequest(self._plan.needs[peer]))
            for peer in sorted(self._features_pending & self._peers)
        ]
        if self._features_pending:
            self._deadlines[_FEATURES_TIMER] = now + self._plan.timeout
            return actions
        return actions + self._begin_learning(now)

    def _begin_learning(self, now: float) -> list[Action[W]]:
        self._deadlines.pop(_FEATURES_TIMER, None)
        self._learning = True
        return self._on_begin(now)

    def _peer_up(self, peer: str, now: float) -> list[Action[W]]:
        if peer == self.node_id or peer in self._penalized or peer in self._peers:
            return []
        self._peers.add(peer)
        actions: list[Action[W]] = []
        if self._started and not self._learning and peer in self._features_pending:
            actions.append(Send(peer, FeatureRequest(self._plan.needs[peer])))
        return actions + self._on_peer_up(peer, now)

    def _fire_timers(self, now: float) -> list[Action[W]]:
        actions: list[Action[W]] = []
        due = sorted((at, name) for name, at in self._deadlines.items() if at <= now)
        for _, name in due:
            if self._deadlines.get(name, math.inf) > now:
                continue  # cancelled or moved by an earlier timer of this same call
            del self._deadlines[name]
            if name == _FEATURES_TIMER:
                missing = ", ".join(sorted(self._features_pending))
                actions.append(Log(f"starting without features from {missing}", "warning"))
                actions += self._begin_learning(now)
            else:
                actions += self._on_timer(name, now)
        return actions

    def _on_received(self, peer: str, message: Message[W], now: float) -> list[Action[W]]:
        if peer in self._penalized:
            return self._drop("penalized_peer")
        if isinstance(message, FeatureRequest):
            return self._serve_features(peer, message)
        if isinstance(message, FeatureReply):
            return self._take_features(peer, message, now)
        return self._on_message(peer, message, now)

    # -- feature exchange -----------------------------------------------------------------

    def _serve_features(self, peer: str, request: FeatureRequest) -> list[Action[W]]:
        data = self._plan.source(request.sensors) if self._plan.source else None
        if data is None:
            return self._drop("features_not_owned")
        self.bytes_features_sent += len(data)
        return [
            Send(peer, FeatureReply(request.sensors, data)),
            Metric("feature_bytes_sent", len(data)),
        ]

    def _take_features(self, peer: str, reply: FeatureReply, now: float) -> list[Action[W]]:
        needs = self._plan.needs
        if peer not in needs:
            return self._reject(peer, "features_not_owner")  # it owns none of our halo
        if peer not in self._features_pending:
            return self._drop("unexpected_features")  # already taken: a duplicate
        planned = {s for owned in needs.values() for s in owned}
        if any(s not in planned for s in reply.sensors):
            return self._reject(peer, "features_unknown_sensor")
        if any(s not in needs[peer] for s in reply.sensors):
            return self._reject(peer, "features_not_owner")  # another owner's sensors
        if reply.sensors != needs[peer]:
            return self._reject(peer, "wrong_features")
        if self._plan.check is not None:
            reason = self._plan.check(reply.sensors, reply.data)
            if reason is not None:
                return self._reject(peer, reason)
        self._features_pending.discard(peer)
        self.bytes_features_received += len(reply.data)
        actions: list[Action[W]] = [
            UseFeatures(peer, reply.sensors, reply.data),
            Metric("feature_bytes_received", len(reply.data)),
        ]
        if not self._features_pending and self._started and not self._learning:
            actions += self._begin_learning(now)
        return actions

    # -- helpers for subclasses -----------------------------------------------------------

    def _drop(self, reason: str) -> list[Action[W]]:
        self.dropped[reason] += 1
        return []

    def _reject(self, peer: str, reason: str) -> list[Action[W]]:
        """A peer sent something that fails validation: drop it, strike, maybe penalize."""
        self.dropped[reason] += 1
        self._strikes[peer] += 1
        if self._strikes[peer] < self._strikes_to_penalize or peer in self._penalized:
            return []
        self._penalized.add(peer)
        actions: list[Action[W]] = [Penalize(peer, reason)]
        if peer in self._peers:
            self._peers.discard(peer)
            actions += self._on_peer_down(peer, self._now)
        return actions

    def _validated(self, peer: str, reference: W, update: W) -> tuple[bool, list[Action[W]]]:
        reason = self._ops.validate(reference, update)
        if reason is None:
            return True, []
        return False, self._reject(peer, f"invalid_update:{reason}")

    def _train(self, weights: W) -> list[Action[W]]:
        if self._training:
            raise AssertionError("a second Train while one is outstanding")
        self._training = True
        self._train_input = weights
        return [Train(weights, self._budget)]

    def _adaptive_clip(self) -> bool:
        return (
            self._aggregation == "clip"
            and self._settings.clip_radius is None
            and self._ops_takes_params
        )

    def _note_training_step(self, trained: W) -> None:
        """This node's own training step is an honest distance: it sets the clipping scale."""
        if self._adaptive_clip() and self._train_input is not None:
            self._distances.append(self._ops.distance(self._train_input, trained))
        self._train_input = None

    def clip_radius(self) -> float | None:
        """The radius "clip" uses for the next merge (None: not clipping, or no params)."""
        if self._aggregation != "clip" or not self._ops_takes_params:
            return None
        if self._settings.clip_radius is not None:
            return self._settings.clip_radius
        if not self._distances:
            return 0.0
        ordered = sorted(self._distances)
        return self._settings.clip_scale * ordered[(len(ordered) - 1) // 2]

    def _rule_params(self, models: list[W], reference: W) -> dict[str, float]:
        s, rule = self._settings, self._aggregation
        if rule == "clip":
            radius = self.clip_radius()
            assert radius is not None
            if self._adaptive_clip() and radius > 0:
                for model in models:
                    if model is not reference:
                        distance = self._ops.distance(reference, model)
                        self._distances.append(min(distance, radius))
            if s.clip_iterations > 1:
                return {"clip_radius": radius, "clip_iterations": s.clip_iterations}
            return {"clip_radius": radius}
        if rule == "trimmed_mean":
            return {"trim_fraction": s.trim_fraction}
        if rule in ("krum", "multikrum"):
            params: dict[str, float] = {}
            if s.krum_f is not None:
                params["krum_f"] = min(s.krum_f, len(models) - 1)
            if rule == "multikrum" and s.krum_m is not None:
                params["krum_m"] = min(s.krum_m, len(models))
            return params
        return {}

    def _outlier(self, peer: str, model: W) -> tuple[bool, list[Action[W]]]:
        """Whether ``peer``'s ``model`` is an outlier under ``clip_outlier``; an outlier is a
        rejected update (counted, a strike against the peer: see ``strikes_to_penalize``).

        Its distance from this node's model (the centre of the merge it would enter) joins the
        window first; the limit is ``clip_outlier`` x the window's median, so it follows what
        peers send, not this node's own steps: a node that drifted from all its peers still
        merges them, while a minority sending far-away models is dropped before it takes an
        inbox place or a merge weight.
        """
        if self._aggregation not in OUTLIER_RULES or math.isinf(self._settings.clip_outlier):
            return False, []
        if not self._ops_takes_params:
            return False, []
        distance = self._ops.distance(self._model, model)
        self._received.append(distance)
        ordered = sorted(self._received)
        if distance <= self._settings.clip_outlier * ordered[(len(ordered) - 1) // 2]:
            return False, []
        return True, self._reject(peer, "clip_outlier")

    def _aggregate(self, models: list[W], weights: list[float], reference: W | None = None) -> W:
        """Merge ``models`` by the configured rule around ``reference`` (default: the model).

        A lone model is returned as is, unless clipping must bound it (it is not the reference).
        """
        centre = self._model if reference is None else reference
        if len(models) == 1 and (self._aggregation != "clip" or models[0] is centre):
            return models[0]
        if not self._ops_takes_params:
            return self._ops.aggregate(self._aggregation, centre, models, weights)
        params = self._rule_params(models, centre)
        return self._ops.aggregate(self._aggregation, centre, models, weights, params)

    def _capped_samples(self, samples: list[int], ratio: float) -> list[float]:
        """Sample counts as merge weights, each capped at ``ratio`` x the lower median; as they
        are where the rule does not weigh (nothing capped, nothing counted)."""
        if self._aggregation not in WEIGHTED_RULES:
            return [float(n) for n in samples]
        ordered = sorted(samples)
        cap = ratio * max(ordered[(len(ordered) - 1) // 2], 1)
        capped = sum(1 for n in samples if n > cap)
        if capped:
            self.dropped["samples_capped"] += capped
        return [float(min(n, cap)) for n in samples]

    def _evaluation_due(self) -> list[Action[W]]:
        """``Evaluate(model)`` when ``rounds`` just reached a multiple of ``evaluate_every``."""
        if self._evaluate_every > 0 and self.rounds % self._evaluate_every == 0:
            return [Evaluate(self._model)]
        return []

    def _finish(self) -> list[Action[W]]:
        self.finished = True
        for name in list(self._deadlines):
            if name != _FEATURES_TIMER:
                del self._deadlines[name]
        return [Log(f"finished after {self.rounds} rounds")]

    # -- hooks ----------------------------------------------------------------------------

    def _on_begin(self, now: float) -> list[Action[W]]:
        raise NotImplementedError

    def _on_peer_up(self, peer: str, now: float) -> list[Action[W]]:
        return []

    def _on_peer_down(self, peer: str, now: float) -> list[Action[W]]:
        return []

    def _on_timer(self, name: str, now: float) -> list[Action[W]]:
        raise NotImplementedError

    def _on_message(self, peer: str, message: Message[W], now: float) -> list[Action[W]]:
        raise NotImplementedError

    def _on_trained(self, weights: W, report: TrainingReport, now: float) -> list[Action[W]]:
        raise NotImplementedError
