"""One factory: a learning setup becomes a protocol machine, the same way in daemon and engines.

:class:`~p2pfl.learning.setup.LearningSetup` (checked when it is built) is what the daemon's
``[protocol]`` table and a scenario's ``[[setup]]`` table say about the learner;
:func:`make_learner` turns it into a :class:`p2pfl.protocols.Learner`. Problems are
:class:`SetupError` with the setup key (``"aggregation"``); each caller prefixes its own table
and line (``file:line: protocol.aggregation: ...`` in the daemon).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Collection
from typing import Any

from p2pfl.learning.setup import PROTOCOLS, LearningSetup, SetupError, parameters
from p2pfl.protocols import FeaturePlan, Learner, ModelOps, ServerFreeLearner

__all__ = ["PROTOCOLS", "LearningSetup", "SetupError", "bounded_ops", "make_learner", "parameters"]


def bounded_ops(ops: ModelOps[Any], max_norm: float | None) -> ModelOps[Any]:
    """``ops`` with the setup's update norm bound (``StateDictOps.max_norm``) set."""
    if max_norm is None:
        return ops
    if not hasattr(ops, "max_norm"):
        raise SetupError("max_norm", "this workload's model operations take no norm bound")
    bounded = copy.copy(ops)
    bounded.max_norm = max_norm
    return bounded


def make_learner(
    setup: LearningSetup,
    node_id: str,
    weights: Any,
    ops: ModelOps[Any],
    rng: random.Random,
    *,
    neighbours: Collection[str] | None = None,
    features: FeaturePlan | None = None,
    rounds_done: int = 0,
) -> Learner[Any]:
    """The protocol machine for ``setup`` at ``node_id``, starting from ``weights``.

    ``neighbours``: server-free's peer set, resolved by the caller with
    :func:`p2pfl.learning.neighbours.resolve` (None: all live peers). ``rounds_done``: trainings
    this node did in earlier sessions (gossip's ``max_rounds`` counts what is left).
    """
    learner_cls, _ = PROTOCOLS[setup.protocol]
    config = setup.config(rounds_done=rounds_done)
    ops = bounded_ops(ops, setup.max_norm)
    try:
        if setup.protocol == "server-free":
            return ServerFreeLearner(
                node_id, weights, ops, rng, config, neighbours=neighbours, features=features
            )
        return learner_cls(node_id, weights, ops, rng, config, features=features)
    except ValueError as exc:
        key = "aggregation" if "aggregation" in str(exc) else "protocol"
        raise SetupError(key, str(exc)) from None
