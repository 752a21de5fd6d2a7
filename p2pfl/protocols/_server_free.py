"""Server-free federated learning (D-PSGD style): numbered rounds, no coordinator.

Round ``r``: train the current model, send the result to every live neighbour, collect the
neighbours' round-``r`` models until all expected ones arrived or ``round_timeout`` passed since
sending, aggregate (own model included, weighted by sample counts), adopt, and go on to ``r + 1``.

Invariants:
- The expected set of round ``r`` is fixed when the node sends: live neighbours at that moment,
  minus those that go down before the round closes. A missing neighbour delays nobody past the
  deadline; one that comes up mid-round takes part from the next round.
- Models for a later round (up to ``max_ahead`` rounds ahead) are buffered. A round further
  ahead is a claim this node cannot check: it is rejected (``round_clamped``) and the model is
  buffered as the peer's model for round + ``max_ahead`` (what the peer could have sent
  honestly), so an inflated round buys no influence and the peer's training is not lost.
  Earlier rounds, or a second model from one peer for one round, are dropped and counted.
- Catch-up: every valid model tells the round its sender is in. After closing round ``r`` the
  node continues with ``max(r + 1, m)``, ``m`` the lower median of the latest rounds of its live
  neighbours, so a node that was away (or restarted from a checkpoint at round 0) rejoins its
  neighbours instead of lagging forever, while one lying peer among two or more cannot move it
  (a node with a single neighbour follows it: nothing else can tell it the live round).
- Aggregation (own model included) is centred on the model this round's training started from:
  with "clip" (the default: centred clipping, 3 steps, radius 1 x the median recent distance)
  each model's difference from the centre is clipped to the radius, own model included. Sample
  counts weigh at most ``max_sample_ratio`` x the lower median of the round's counts.
- Every received model is validated against the current model before it is buffered.
- Neighbours: all live peers, or the given set (e.g. cloudlets within communication range);
  models from outside that set are dropped.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass

from ._actions import Action, Adopt, Metric, Send
from ._base import Learner, SampleWeightedSettings, W
from ._events import TrainingReport
from ._messages import Message, RoundUpdate
from ._ops import FeaturePlan, ModelOps

_ROUND = "round"


@dataclass(frozen=True, slots=True)
class ServerFreeConfig(SampleWeightedSettings):
    clip_scale: float = 1.0
    clip_iterations: int = 3
    round_timeout: float = 10.0
    """Seconds to wait for neighbours' models after sending ours."""
    max_ahead: int = 2
    """Models up to this many rounds ahead are buffered; further ahead, they count for the
    furthest buffered round (the claim is rejected, counted as ``round_clamped``)."""


class ServerFreeLearner(Learner[W]):
    def __init__(
        self,
        node_id: str,
        weights: W,
        ops: ModelOps[W],
        rng: random.Random,
        config: ServerFreeConfig | None = None,
        *,
        neighbours: Collection[str] | None = None,
        features: FeaturePlan | None = None,
    ) -> None:
        self.config = config or ServerFreeConfig()
        super().__init__(node_id, weights, ops, rng, self.config, features=features)
        self._neighbours = None if neighbours is None else frozenset(neighbours)
        self.round = 0
        self._own: tuple[W, int] | None = None
        self._expected: set[str] = set()
        self._pending: dict[int, dict[str, tuple[W, int] | None]] = {}
        self._latest: dict[str, int] = {}

    @property
    def rounds(self) -> int:
        return self.round

    @property
    def neighbours(self) -> frozenset[str] | None:
        """The peers this node exchanges models with (None: every live peer)."""
        return self._neighbours

    def _is_neighbour(self, peer: str) -> bool:
        return self._neighbours is None or peer in self._neighbours

    def _on_begin(self, now: float) -> list[Action[W]]:
        return self._train(self._model)

    def _on_trained(self, weights: W, report: TrainingReport, now: float) -> list[Action[W]]:
        self._own = (weights, report.samples)
        self._expected = {p for p in self._peers if self._is_neighbour(p)}
        actions: list[Action[W]] = [
            Send(peer, RoundUpdate(self.round, weights, report.samples))
            for peer in sorted(self._expected)
        ]
        self._deadlines[_ROUND] = now + self.config.round_timeout
        return actions + self._close_if_complete(now)

    def _on_message(self, peer: str, message: Message[W], now: float) -> list[Action[W]]:
        if not isinstance(message, RoundUpdate):
            return self._drop("wrong_protocol")
        if not self._is_neighbour(peer):
            return self._drop("not_neighbour")
        k = message.round
        if k < self.round:
            return self._drop("late")
        if peer in self._pending.get(k, {}):
            return self._drop("duplicate")
        ok, actions = self._validated(peer, self._model, message.weights)
        if not ok:
            return actions
        self._latest[peer] = max(k, self._latest.get(peer, 0))
        if k > self.round + self.config.max_ahead:
            # The claim is rejected, the model is not: it counts as the peer's model for the
            # furthest round this node buffers, as if sent for that round (one per peer).
            self.dropped["round_clamped"] += 1
            k = self.round + self.config.max_ahead
            if peer in self._pending.get(k, {}):
                return self._drop("duplicate")
        # An outlier (clip_outlier) counts as arrived, so the round does not wait for it (a peer
        # penalized for it has left the round already).
        outlier, actions = self._outlier(peer, message.weights)
        if not outlier or peer in self._peers:
            update = None if outlier else (message.weights, message.samples)
            self._pending.setdefault(k, {})[peer] = update
        if k == self.round:
            return actions + self._close_if_complete(now)
        return actions

    def _on_peer_down(self, peer: str, now: float) -> list[Action[W]]:
        self._expected.discard(peer)
        self._latest.pop(peer, None)
        return self._close_if_complete(now)

    def _on_timer(self, name: str, now: float) -> list[Action[W]]:
        return self._close_round(now)

    def _close_if_complete(self, now: float) -> list[Action[W]]:
        if self._own is None or _ROUND not in self._deadlines:
            return []
        if not self._expected <= set(self._pending.get(self.round, {})):
            return []
        del self._deadlines[_ROUND]
        return self._close_round(now)

    def _close_round(self, now: float) -> list[Action[W]]:
        assert self._own is not None
        received = {
            p: update
            for p, update in self._pending.pop(self.round, {}).items()
            if update is not None
        }
        own = self._own[0]
        models = [own] + [received[p][0] for p in sorted(received)]
        samples = self._capped_samples(
            [self._own[1]] + [received[p][1] for p in sorted(received)],
            self.config.max_sample_ratio,
        )
        # Centred on the model this round's training started from (this node's last merge), as
        # FedAvg's clipping is centred on the global model: every input, own included, is then
        # one round's progress, and the radius a multiple of one training step.
        self._model = self._aggregate(models, samples, reference=self._model)
        self._own = None
        actions: list[Action[W]] = [
            Adopt(self._model),
            Metric("round_completed", self.round),
            Metric("round_models_merged", len(models)),
        ]
        self._deadlines.pop(_ROUND, None)
        latest = sorted(self._latest[p] for p in self._peers if p in self._latest)
        neighbours_round = latest[(len(latest) - 1) // 2] if latest else 0
        self.round = max(self.round + 1, neighbours_round)
        self._pending = {k: v for k, v in self._pending.items() if k >= self.round}
        actions += self._evaluation_due()
        if self._max_rounds is not None and self.round >= self._max_rounds:
            return actions + self._finish()
        return actions + self._train(self._model)
