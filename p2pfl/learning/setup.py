"""The learning setup: one typed description, one validator, for the daemon and both engines.

:class:`LearningSetup` is everything that decides how a node learns: the protocol and its own
parameters, the aggregation rule and the rule's parameters, the update norm bound, which peers a
server-free node exchanges with, how models travel and how much it trains per round. A scenario's
``[[setup]]`` table is one (flat keys); the daemon reads the same keys from its ``[protocol]``
table (the protocol's own and the rule's parameters under ``[protocol.params]``, the training
budget as ``[task] epochs``: see :data:`DAEMON_PLACES`), and the processes engine writes a setup
into each daemon's configuration with :func:`daemon_tables`. Both are checked by this model only.

A key left out (None) means the protocol's own default. A key that the chosen protocol or rule
does not read is refused, never ignored: ``period`` on server-free, ``krum_f`` with "clip",
``range_km`` without neighbours = "range".

Adding a parameter to a protocol: a field on its config dataclass (``p2pfl.protocols``) and the
same field here; the factory, both engines, the daemon and the processes engine pick it up.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from p2pfl.learning.codecs import codec_problem
from p2pfl.protocols import (
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

PROTOCOLS: dict[str, tuple[type[Learner[Any]], type[Any]]] = {
    "gossip": (GossipLearner, GossipConfig),
    "server-free": (ServerFreeLearner, ServerFreeConfig),
    "fedavg": (FedAvgLearner, FedAvgConfig),
}

RULE_KEYS: dict[str, tuple[str, ...]] = {
    "clip_radius": ("clip",),
    "clip_scale": ("clip",),
    "clip_window": ("clip",),
    "krum_f": ("krum", "multikrum"),
    "krum_m": ("multikrum",),
    "trim_fraction": ("trimmed_mean",),
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
    """None: the protocol's robust default ("clip" for gossip/server-free, "multikrum" FedAvg)."""
    epochs: float = Field(1.0, gt=0)
    """Local training per round (gossip: per tick), in epochs: the learner's budget."""
    codec: str = "fp32"
    """How every model a node sends is encoded (``learning.codecs``)."""
    neighbours: NeighboursName = "all"
    """Server-free: "all" live peers, "topology" links, or "range" (within range_km)."""
    range_km: float | None = _opt(gt=0)
    """For neighbours = "range"; None: the task's own range (graph tasks; the daemon needs it)."""
    max_norm: float | None = _opt(gt=0)
    """Refuse (drop, counted as ``norm_exceeded``) an update farther than this L2 distance from the
    receiver's model; None: no bound (clipping still bounds its effect)."""
    # -- the aggregation rule's parameters (see protocols.LearnerSettings)
    clip_radius: float | None = _opt(ge=0)
    clip_scale: float | None = _opt(gt=0)
    clip_window: int | None = _opt(ge=1)
    krum_f: int | None = _opt(ge=0)
    krum_m: int | None = _opt(ge=1)
    trim_fraction: float | None = _opt(ge=0, lt=0.5)
    # -- what every protocol reads
    max_rounds: int | None = _opt(ge=1)
    max_sample_ratio: float | None = _opt(ge=1)
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
        if self.neighbours != "all" and self.protocol != "server-free":
            raise SetupError(
                "neighbours",
                f"only server-free exchanges with a chosen set of peers; {self.protocol} needs "
                '"all" (remove the key)',
            )
        if self.range_km is not None and self.neighbours != "range":
            raise SetupError("range_km", 'applies only with neighbours = "range"; remove it')
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


def _fields(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def _default(config_cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(config_cls) if f.name == name)


GENERAL_KEYS = ("protocol", "aggregation", "epochs", "codec", "neighbours", "range_km", "max_norm")
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
    """The keys a setup sets (None left out): what a ``[[setup]]`` table would say."""
    return {k: v for k, v in setup.model_dump().items() if v is not None}


# -- the daemon's spelling -------------------------------------------------------------------

DAEMON_PLACES: dict[str, str] = {
    "protocol": "protocol.name",
    "epochs": "task.epochs",
    **{k: f"protocol.{k}" for k in GENERAL_KEYS if k not in ("protocol", "epochs")},
    **{k: f"protocol.params.{k}" for k in PARAMETER_KEYS},
}
"""Where the daemon's configuration holds each setup key (dotted TOML path)."""


def daemon_tables(setup: LearningSetup) -> dict[str, dict[str, Any]]:
    """The setup as daemon configuration tables ({"protocol": ..., "protocol.params": ...,
    "task": ...}); the daemon reads it back with :func:`from_daemon` to the same setup."""
    tables: dict[str, dict[str, Any]] = {"protocol": {}, "protocol.params": {}, "task": {}}
    for key, value in setup_values(setup).items():
        table, _, name = DAEMON_PLACES[key].rpartition(".")
        tables[table][name] = value
    return tables


def from_daemon(
    protocol: Mapping[str, Any], params: Mapping[str, Any], task: Mapping[str, Any]
) -> tuple[LearningSetup | None, str, str]:
    """Read the setup from a daemon's raw [protocol], [protocol.params] and [task] values.

    Returns (setup, "", "") or (None, dotted key, problem): the daemon's loader adds the file and
    line. Only the setup keys are read; the daemon's own keys of those tables are its business.
    """
    values: dict[str, Any] = {}
    places: dict[str, str] = {}
    for key, place in DAEMON_PLACES.items():
        table, _, name = place.rpartition(".")
        source = {"protocol": protocol, "protocol.params": params, "task": task}[table]
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
        return parse_setup(values), "", ""
    except SetupError as exc:
        return None, places.get(exc.key, DAEMON_PLACES.get(exc.key, exc.key)), exc.problem
