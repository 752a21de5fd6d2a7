"""What the driver injects into a learner: model operations, peer sampling, feature plans.

The machines never touch tensors: a model is an opaque handle ``W`` owned by the driver. Two
decisions need to look inside models — is a received update acceptable, and what is the
aggregate of several — so the driver injects a ``ModelOps`` object and the machine calls it
synchronously inside ``handle``. Its methods must be pure and deterministic (same inputs, same
output; no I/O, no clock, no randomness), which keeps the machine replayable: the virtual engine
and the unit tests get identical action lists for identical inputs. A driver that finds
aggregation too slow for its event loop runs ``handle`` itself in a worker thread; the machine
holds no I/O objects, so that is safe.

``p2pfl.ml.aggregation.StateDictOps`` implements ``ModelOps`` over torch state_dicts
(``validate_update``, ``state_norm``, ``aggregate``); the unit tests implement it over plain
floats. An older ops object without ``distance`` (rules by name only, default parameters) is
still accepted: the machines then pass no ``params`` and clip with the rule's stateless radius.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

W = TypeVar("W")


class ModelOps(Protocol[W]):
    """Validation and aggregation of opaque model handles (pure, deterministic)."""

    @property
    def rules(self) -> Collection[str]:
        """Names of the aggregation rules ``aggregate`` knows ("mean", "median", ...)."""
        ...

    def validate(self, reference: W, update: W) -> str | None:
        """None if ``update`` may be merged into a model like ``reference``, else a reason slug."""
        ...

    def distance(self, reference: W, update: W) -> float:
        """The L2 distance between two models (what self-centred clipping bounds)."""
        ...

    def aggregate(
        self,
        rule: str,
        reference: W,
        models: Sequence[W],
        weights: Sequence[float],
        params: Mapping[str, float] | None = None,
    ) -> W:
        """Combine ``models`` (non-empty) with ``weights`` by ``rule`` and its ``params``
        (e.g. ``clip_radius``, ``krum_f``, ``trim_fraction``); ``reference`` is the model the
        result replaces (the centre of clipping). Must not modify its inputs."""
        ...


PeerSampler = Callable[[Sequence[str], random.Random], str]
"""Draws one peer from a non-empty, sorted sequence of live peers, using only the given rng."""


def uniform_peer(peers: Sequence[str], rng: random.Random) -> str:
    """The default peer-sampling policy: uniform over the known live peers."""
    return peers[rng.randrange(len(peers))]


FeatureSource = Callable[[tuple[int, ...]], bytes | None]
"""The readings of the given sensors, encoded; None if this node does not own all of them."""

FeatureCheck = Callable[[tuple[int, ...], bytes], str | None]
"""None if a reply's encoded readings of the given sensors are acceptable, else a reason slug
(wrong length, values not finite or out of range): pure, like ``ModelOps``."""


@dataclass(frozen=True, slots=True)
class FeaturePlan:
    """Graph tasks: which node features this node needs from whom, and what it can serve.

    ``needs`` maps a peer to the sensors (its own) whose readings this node needs (its halo).
    Learning starts when every needed reply arrived, or ``timeout`` seconds after ``Start``
    (missing halo readings then stay missing, as the task's masking allows). A reply is taken
    only from the owner it was asked of, for exactly the sensors asked, and only if ``check``
    (when given) accepts its data; anything else is dropped with a reason and the owner stays
    pending.
    """

    needs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    source: FeatureSource | None = None
    timeout: float = 30.0
    check: FeatureCheck | None = None
