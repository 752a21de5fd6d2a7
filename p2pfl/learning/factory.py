"""One factory: a learner setup becomes a protocol machine, the same way in daemon and engines.

:class:`LearnerSetup` is what the daemon's ``[protocol]`` table and a scenario's ``[[setup]]``
table say about the learner: the protocol and its own parameters, the aggregation rule, the
local training per round, which peers it exchanges with and how models travel (``codec``, see
``p2pfl.learning.codecs``). :func:`make_learner` turns it into
a :class:`p2pfl.protocols.Learner`; :func:`check_setup` is the part of that which needs no model,
so configuration loaders can refuse a bad setup before anything runs.

Problems are :class:`SetupError` with the key relative to the setup table (``"params.period"``,
``"neighbours"``, ``"aggregation"``); each caller prefixes its own table and reports it in its
own error format (``file:line: protocol.params.period: ...`` in the daemon).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pfl.learning.codecs import codec_problem
from p2pfl.learning.neighbours import NEIGHBOURS
from p2pfl.protocols import (
    FeaturePlan,
    FedAvgConfig,
    FedAvgLearner,
    GossipConfig,
    GossipLearner,
    Learner,
    ModelOps,
    ServerFreeConfig,
    ServerFreeLearner,
)

ParamValue = str | int | float | bool

PROTOCOLS: dict[str, tuple[type[Learner[Any]], type[Any]]] = {
    "gossip": (GossipLearner, GossipConfig),
    "server-free": (ServerFreeLearner, ServerFreeConfig),
    "fedavg": (FedAvgLearner, FedAvgConfig),
}

_SET_BY_SETUP = frozenset({"budget", "aggregation"})
"""Config fields that are keys of the setup itself, not protocol parameters."""


class SetupError(ValueError):
    """A setup the factory refuses; ``key`` is relative to the setup table."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class LearnerSetup:
    protocol: str
    aggregation: str | None = None
    """None: the protocol's robust default (self-centred clipping for gossip and server-free,
    multi-Krum for FedAvg); plain "mean" only when asked for."""
    budget: float = 1.0
    """Local training per round (gossip: per tick), in epochs."""
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    """The protocol's own parameters (see :func:`parameters`), e.g. period, round_timeout."""
    neighbours: str = "all"
    """Server-free: "all" live peers, "topology" links or "range" (see ``neighbours``)."""
    codec: str = "fp32"
    """How every model this node sends is encoded (``learning.codecs.CODECS``)."""


def parameters(protocol: str) -> tuple[str, ...]:
    """The names ``params`` may hold for ``protocol``."""
    _, config_cls = PROTOCOLS[protocol]
    return tuple(
        sorted(f.name for f in dataclasses.fields(config_cls) if f.name not in _SET_BY_SETUP)
    )


def check_setup(setup: LearnerSetup) -> None:
    """Refuse what no model is needed to refuse: protocol, parameter names, neighbours, codec."""
    if setup.protocol not in PROTOCOLS:
        raise SetupError(
            "protocol", f"unknown protocol {setup.protocol!r}; known: {', '.join(PROTOCOLS)}"
        )
    known = parameters(setup.protocol)
    for name in setup.params:
        if name not in known:
            raise SetupError(
                f"params.{name}",
                f"not a parameter of {setup.protocol}; known: {', '.join(known)}",
            )
    if setup.neighbours not in NEIGHBOURS:
        raise SetupError(
            "neighbours", f"must be one of {', '.join(NEIGHBOURS)}, got {setup.neighbours!r}"
        )
    if setup.neighbours != "all" and setup.protocol != "server-free":
        raise SetupError(
            "neighbours",
            f'only server-free exchanges with a chosen set of peers; {setup.protocol} needs "all"',
        )
    if (problem := codec_problem(setup.codec)) is not None:
        raise SetupError("codec", problem)
    _config(setup, rounds_done=0)


def _config(setup: LearnerSetup, *, rounds_done: int) -> Any:
    _, config_cls = PROTOCOLS[setup.protocol]
    params = dict(setup.params)
    max_rounds = params.get("max_rounds")
    if setup.protocol == "gossip" and isinstance(max_rounds, int) and rounds_done > 0:
        # Gossip counts trainings per session: a node that rejoins (a restarted daemon, a churned
        # virtual node) does only what is left of its planned trainings.
        params["max_rounds"] = max(1, max_rounds - rounds_done)
    try:
        rule = {} if setup.aggregation is None else {"aggregation": setup.aggregation}
        return config_cls(**params, budget=setup.budget, **rule)
    except (TypeError, ValueError) as exc:
        raise SetupError("params", str(exc)) from None


def make_learner(
    setup: LearnerSetup,
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
    check_setup(setup)
    learner_cls, _ = PROTOCOLS[setup.protocol]
    config = _config(setup, rounds_done=rounds_done)
    try:
        if setup.protocol == "server-free":
            return ServerFreeLearner(
                node_id, weights, ops, rng, config, neighbours=neighbours, features=features
            )
        return learner_cls(node_id, weights, ops, rng, config, features=features)
    except ValueError as exc:
        key = "aggregation" if "aggregation" in str(exc) else "params"
        raise SetupError(key, str(exc)) from None
