"""The learning setup: one typed description, one validator, for the daemon and both engines.

:class:`LearningSetup` is everything that decides how a node learns: the protocol and its own
parameters, the aggregation rule and the rule's parameters, the update norm bound, which peers a
server-free node exchanges with, how models travel, how much it trains per round and how its
local trainings follow on from each other (a learning-rate schedule over its planned trainings,
Adam moments kept between trainings). A scenario's ``[[setup]]`` table is one (flat keys; its
``[training]`` lr_schedule, lr_final and keep_optimizer are every setup's default); the daemon
reads the same keys from its ``[protocol]`` table (the protocol's own and the rule's parameters
under ``[protocol.params]``, the training keys as ``[task] epochs``, ``lr_schedule``,
``lr_final``, ``keep_optimizer``: see :data:`DAEMON_PLACES`), and the processes engine writes
a setup into each daemon's configuration with :func:`daemon_tables`. Both are checked by this
model only.

A key left out (None) means the protocol's own default. A key that the chosen protocol or rule
does not read is refused, never ignored: ``period`` on server-free, ``krum_f`` with "clip",
``range_km`` without neighbours = "range".

Adding a parameter to a protocol: a field on its config dataclass (``p2pfl.protocols``) and the
same field here; the factory, both engines, the daemon and the processes engine pick it up.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from p2pfl.learning.codecs import codec_problem
from p2pfl.protocols import (
    OUTLIER_RULES,
    WEIGHTED_RULES,
    FedAvgConfig,
    FedAvgLearner,
    GossipConfig,
    GossipLearner,
    Learner,
    ServerFreeConfig,
    ServerFreeLearner,
)

ProtocolName = Literal["gossip", "server-free", "fedavg"]
RuleName = Literal["mean", "median", "trimmed_mean", "clip", "krum", "multikrum"]
NeighboursName = Literal["all", "topology", "range"]
ScheduleName = Literal["constant", "cosine"]

PROTOCOLS: dict[str, tuple[type[Learner[Any]], type[Any]]] = {
    "gossip": (GossipLearner, GossipConfig),
    "server-free": (ServerFreeLearner, ServerFreeConfig),
    "fedavg": (FedAvgLearner, FedAvgConfig),
}

RULE_KEYS: dict[str, tuple[str, ...]] = {
    "clip_radius": ("clip",),
    "clip_scale": ("clip",),
    "clip_window": OUTLIER_RULES,  # "clip": its radius's window too
    "clip_iterations": ("clip",),
    "clip_outlier": OUTLIER_RULES,
    "krum_f": ("krum", "multikrum"),
    "krum_m": ("multikrum",),
    "trim_fraction": ("trimmed_mean",),
    "max_sample_ratio": WEIGHTED_RULES,  # server-free and FedAvg only (gossip weighs by age)
}
"""Each rule parameter and the rules that read it."""


class SetupError(ValueError):
    """A setup refused; ``key`` is the setup key (a caller prefixes its table and line)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _opt(default: Any = None, **limits: Any) -> Any:
    return Field(default, **limits)


class LearningSetup(BaseModel):
    """One learning setup. Field docs are the reference (simulations/README.md, p2pfl.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    protocol: ProtocolName
    aggregation: RuleName | None = None
    """None: the protocol's robust default ("clip")."""
    epochs: float = Field(1.0, gt=0)
    """Local training per round (gossip: per tick), in epochs: the learner's budget."""
    codec: str = "fp32"
    """How every model a node sends is encoded (``learning.codecs``)."""
    neighbours: NeighboursName = "all"
    """Server-free: "all" live peers, "topology" links, or "range" (within range_km)."""
    range_km: float | None = _opt(gt=0)
    """For neighbours = "range"; None: the task's own range (graph tasks; the daemon needs it)."""
    lr_schedule: ScheduleName = "constant"
    """"cosine": the node's learning rate falls from the task's lr to lr * lr_final over its
    planned trainings (max_rounds; a scenario without stop.rounds: over stop.time)."""
    lr_final: float = Field(0.1, ge=0, le=1)
    """The last factor of the cosine schedule (only with lr_schedule = "cosine")."""
    keep_optimizer: bool = False
    """Keep the node's Adam moments from one local training to the next (default: fresh).
    A restarted node (daemon or churned virtual node) starts fresh moments."""
    max_norm: float | None = _opt(gt=0)
    """Refuse (drop, counted as ``norm_exceeded``) an update farther than this L2 distance from the
    receiver's model; None: no bound (clipping still bounds its effect)."""
    # -- the aggregation rule's parameters (see protocols.LearnerSettings)
    clip_radius: float | None = _opt(ge=0)
    clip_scale: float | None = _opt(gt=0)
    clip_window: int | None = _opt(ge=1)
    clip_iterations: int | None = _opt(ge=1)
    clip_outlier: float | None = _opt(ge=1)
    krum_f: int | None = _opt(ge=0)
    krum_m: int | None = _opt(ge=1)
    trim_fraction: float | None = _opt(ge=0, lt=0.5)
    max_sample_ratio: float | None = _opt(ge=1)
    # -- what every protocol reads
    max_rounds: int | None = _opt(ge=1)
    strikes_to_penalize: int | None = _opt(ge=1)
    evaluate_every: int | None = _opt(ge=0)
    # -- the protocols' own parameters (each read by the protocols whose config has it)
    period: float | None = _opt(gt=0)
    jitter: float | None = _opt(ge=0, lt=1)
    staleness_window: int | None = _opt(ge=0)
    max_age_lead: int | None = _opt(ge=0)
    inbox_size: int | None = _opt(ge=1)
    round_timeout: float | None = _opt(gt=0)
    max_ahead: int | None = _opt(ge=0)
    aggregator: str | None = None
    # -- links
    max_peers: int | None = _opt(ge=1)
    """Gossip: the most links a node keeps, chosen and refreshed by peer sampling
    (``protocols.PeerSampling``: a view of this many members exchanged by signed shuffles);
    gossip sends to a member of the view. None: no bound (a link to every member)."""

    @model_validator(mode="after")
    def _fits_protocol(self) -> LearningSetup:
        _, config_cls = PROTOCOLS[self.protocol]
        own = {f.name for f in dataclasses.fields(config_cls)}
        for key in PARAMETER_KEYS:
            if getattr(self, key) is not None and key not in own:
                readers = [p for p, (_, c) in PROTOCOLS.items() if key in _fields(c)]
                raise SetupError(
                    key,
                    f"{self.protocol} does not read it (a parameter of {', '.join(readers)}); "
                    "remove the key",
                )
        rule = self.rule
        for key, rules in RULE_KEYS.items():
            if getattr(self, key) is not None and rule not in rules:
                raise SetupError(
                    key,
                    f'the rule "{rule}" does not read it (only {", ".join(rules)}); remove the key '
                    f'or set aggregation = "{rules[0]}"',
                )
        if self.clip_radius is not None and self.clip_scale is not None:
            raise SetupError(
                "clip_scale",
                "scales the adaptive radius, and clip_radius fixes the radius; remove one",
            )
        if self.neighbours != "all" and self.protocol != "server-free":
            raise SetupError(
                "neighbours",
                f"only server-free exchanges with a chosen set of peers; {self.protocol} needs "
                '"all" (remove the key)',
            )
        if "lr_final" in self.model_fields_set and self.lr_schedule != "cosine":
            raise SetupError(
                "lr_final", 'applies only with lr_schedule = "cosine"; remove it or set that'
            )
        if self.range_km is not None and self.neighbours != "range":
            raise SetupError("range_km", 'applies only with neighbours = "range"; remove it')
        if self.max_peers is not None and self.protocol != "gossip":
            raise SetupError(
                "max_peers",
                f"bounds gossip's links by peer sampling; {self.protocol} exchanges with a fixed "
                'set of peers (server-free: neighbours = "topology" or "range"); remove the key',
            )
        if (problem := codec_problem(self.codec)) is not None:
            raise SetupError("codec", problem)
        try:
            self.config(rounds_done=0)
        except (TypeError, ValueError) as exc:
            raise SetupError("protocol", f"{exc}; fix the setup's parameters") from None
        return self

    @property
    def rule(self) -> str:
        """The aggregation rule in effect (the protocol's default when none is set)."""
        if self.aggregation is not None:
            return self.aggregation
        _, config_cls = PROTOCOLS[self.protocol]
        return str(_default(config_cls, "aggregation"))

    def lr_scale(self, trainings_done: int, progress: float | None = None) -> float:
        """The factor on the learning rate of this node's next local training: by the share
        of its planned trainings (``max_rounds``) done, or at ``progress`` (0..1) if given."""
        if self.lr_schedule == "constant":
            return 1.0
        if progress is None:
            if self.max_rounds is None:
                raise ValueError("a learning-rate schedule needs max_rounds (planned trainings)")
            progress = training_progress(trainings_done, self.max_rounds)
        return schedule_scale(self.lr_schedule, self.lr_final, progress)

    def params(self) -> dict[str, Any]:
        """The protocol's config fields this setup sets (rule and protocol parameters)."""
        return {k: getattr(self, k) for k in PARAMETER_KEYS if getattr(self, k) is not None}

    def config(self, *, rounds_done: int = 0) -> Any:
        """The protocol's config dataclass for this setup.

        ``rounds_done``: trainings this node did in earlier sessions; gossip counts trainings
        per session, so a rejoining node (a restarted daemon, a churned virtual node) does only
        what is left of its planned ``max_rounds``.
        """
        _, config_cls = PROTOCOLS[self.protocol]
        params = self.params()
        if self.protocol == "gossip" and self.max_rounds is not None and rounds_done > 0:
            params["max_rounds"] = max(1, self.max_rounds - rounds_done)
        rule = {} if self.aggregation is None else {"aggregation": self.aggregation}
        return config_cls(**params, budget=self.epochs, **rule)


def training_progress(trainings_done: int, planned: int) -> float:
    """A node's progress through its run at its next training: the middle of that training's
    share of the ``planned`` trainings."""
    return (trainings_done + 0.5) / planned


def schedule_scale(schedule: str, lr_final: float, progress: float) -> float:
    """The factor on the learning rate at ``progress`` (0..1, clamped) of a node's run: 1 for
    "constant"; "cosine" falls from 1 to ``lr_final``. The daemon, both engines and the
    centralized baselines compute every scale with this function."""
    if schedule == "constant":
        return 1.0
    p = min(max(progress, 0.0), 1.0)
    return lr_final + (1.0 - lr_final) * 0.5 * (1.0 + math.cos(math.pi * p))


def _fields(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def _default(config_cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(config_cls) if f.name == name)


TRAINING_KEYS = ("lr_schedule", "lr_final", "keep_optimizer")
"""How a node's local trainings follow on from each other (the daemon's [task] keys)."""
GENERAL_KEYS = (
    "protocol",
    "aggregation",
    "epochs",
    "codec",
    "neighbours",
    "range_km",
    "max_norm",
    "max_peers",
    *TRAINING_KEYS,
)
"""Keys of the setup that are not protocol config fields."""
PARAMETER_KEYS = tuple(k for k in LearningSetup.model_fields if k not in GENERAL_KEYS)
"""Keys that are fields of a protocol's config (rule parameters and the protocols' own)."""
SETUP_KEYS = tuple(LearningSetup.model_fields)


def parameters(protocol: str) -> tuple[str, ...]:
    """The parameter keys ``protocol`` reads."""
    own = _fields(PROTOCOLS[protocol][1])
    return tuple(k for k in PARAMETER_KEYS if k in own)


_HINTS = {
    "extra_forbidden": "unknown key (a typo?); remove it",
    "missing": "is required",
}


def parse_setup(values: Mapping[str, Any]) -> LearningSetup:
    """Check ``values`` (TOML scalars by setup key); raise :class:`SetupError` on the first
    problem, naming the key and what to do."""
    try:
        return LearningSetup.model_validate(dict(values))
    except ValidationError as exc:
        raise _setup_error(exc, values) from None


def _setup_error(exc: ValidationError, values: Mapping[str, Any]) -> SetupError:
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"]]
    kind = error["type"]
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), SetupError):
        inner: SetupError = error["ctx"]["error"]
        return SetupError(inner.key, inner.problem)
    key = loc[0] if loc else "protocol"
    if kind in _HINTS:
        hint = _HINTS[kind]
        if kind == "extra_forbidden":
            hint = f"unknown key (a typo?); setup keys: {', '.join(SETUP_KEYS)}"
        return SetupError(key, hint)
    got = values.get(key)
    message = str(error["msg"])
    ctx = error.get("ctx", {})
    if kind == "literal_error":
        message = "must be one of " + ", ".join(f'"{c}"' for c in _choices(key))
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()), "")
        message = f"must be {_BOUNDS[kind]} {bound}"
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        message = "must be " + _TYPES.get(kind.split("_")[0], kind.split("_")[0])
    return SetupError(key, f"{message}; got {got!r}")


_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_TYPES = {"float": "a number", "int": "an integer", "string": "a string", "bool": "true or false"}


def _choices(key: str) -> tuple[str, ...]:
    field = LearningSetup.model_fields.get(key)
    found: list[str] = []
    pending = [field.annotation] if field is not None else []
    while pending:
        hint = pending.pop()
        if typing.get_origin(hint) is Literal:
            found.extend(str(a) for a in typing.get_args(hint))
        else:
            pending.extend(typing.get_args(hint))
    return tuple(found)


def setup_values(setup: LearningSetup) -> dict[str, Any]:
    """The keys a setup sets (None and training keys at their defaults left out): what a
    ``[[setup]]`` table would say."""
    defaults = {k: LearningSetup.model_fields[k].default for k in TRAINING_KEYS}
    return {
        k: v
        for k, v in setup.model_dump().items()
        if v is not None and not (k in defaults and v == defaults[k])
    }


# -- the daemon's spelling -------------------------------------------------------------------

DAEMON_PLACES: dict[str, str] = {
    "protocol": "protocol.name",
    "epochs": "task.epochs",
    "max_peers": "limits.max_peers",
    **{k: f"task.{k}" for k in TRAINING_KEYS},
    **{
        k: f"protocol.{k}"
        for k in GENERAL_KEYS
        if k not in ("protocol", "epochs", "max_peers") and k not in TRAINING_KEYS
    },
    **{k: f"protocol.params.{k}" for k in PARAMETER_KEYS},
}
"""Where the daemon's configuration holds each setup key (dotted TOML path)."""


def daemon_tables(setup: LearningSetup) -> dict[str, dict[str, Any]]:
    """The setup as daemon configuration tables ({"protocol": ..., "protocol.params": ...,
    "task": ...}); the daemon reads it back with :func:`from_daemon` to the same setup."""
    tables: dict[str, dict[str, Any]] = {"protocol": {}, "protocol.params": {}, "task": {}}
    for key, value in setup_values(setup).items():
        table, _, name = DAEMON_PLACES[key].rpartition(".")
        tables.setdefault(table, {})[name] = value
    return tables


def from_daemon(
    protocol: Mapping[str, Any],
    params: Mapping[str, Any],
    task: Mapping[str, Any],
    limits: Mapping[str, Any] | None = None,
) -> tuple[LearningSetup | None, str, str]:
    """Read the setup from a daemon's raw [protocol], [protocol.params], [task] and [limits]
    values.

    Returns (setup, "", "") or (None, dotted key, problem): the daemon's loader adds the file and
    line. Only the setup keys are read; the daemon's own keys of those tables are its business.
    """
    values: dict[str, Any] = {}
    places: dict[str, str] = {}
    for key, place in DAEMON_PLACES.items():
        table, _, name = place.rpartition(".")
        source = {
            "protocol": protocol,
            "protocol.params": params,
            "task": task,
            "limits": limits or {},
        }[table]
        if name in source:
            values[key] = source[name]
            places[key] = place
    for name in params:
        if name not in PARAMETER_KEYS:
            where = f"[protocol] {name}" if name in GENERAL_KEYS else None
            problem = (
                f"not a protocol parameter; write it as {where}"
                if where
                else f"unknown parameter; parameters: {', '.join(PARAMETER_KEYS)}"
            )
            return None, f"protocol.params.{name}", problem
    values.setdefault("protocol", "gossip")
    if isinstance(values.get("epochs"), int) and not isinstance(values["epochs"], bool):
        values["epochs"] = float(values["epochs"])
    try:
        setup = parse_setup(values)
    except SetupError as exc:
        return None, places.get(exc.key, DAEMON_PLACES.get(exc.key, exc.key)), exc.problem
    if setup.lr_schedule != "constant" and setup.max_rounds is None:
        return (
            None,
            DAEMON_PLACES["lr_schedule"],
            "a schedule runs over the node's planned trainings: set [protocol.params] "
            'max_rounds, or remove the key (lr_schedule = "constant")',
        )
    return setup, "", ""
