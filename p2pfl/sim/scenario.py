"""Scenario files: one TOML file describes a simulated experiment, checked before anything runs.

A scenario has one task, network, churn and stop condition, and one or more ``[[setup]]`` tables
(the protocols to compare on exactly that task and network). Every key is checked: an unknown key,
a wrong type or an out-of-range value is a ``ScenarioError`` naming the file and the dotted key.
The whole format, with defaults, is in ``simulations/README.md``.
"""

from __future__ import annotations

import contextlib
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.learning.setup import (
    SETUP_KEYS,
    TRAINING_KEYS,
    LearningSetup,
    SetupError,
    parse_setup,
    schedule_scale,
)
from p2pfl.ml.catalog import TASKS, partition_problem
from p2pfl.sim.attacks import AttackSpec, parse_attacks
from p2pfl.tomlkeys import where

PROTOCOLS = ("centralized", "fedavg", "server-free", "gossip")
TRAINING_PATHS = ("task", "vectorized")


class ScenarioError(ValueError):
    """A scenario file is wrong; the message names the file, the line, the key and what to do:
    ``file:line: dotted.key: what is wrong; what to do``."""


def scenario_error(source: str, text: str | None, key: str, problem: str) -> ScenarioError:
    """The error for ``key`` (``setup[1].period``) of the scenario read from ``text``."""
    return ScenarioError(f"{where(source, text, key)}: {key}: {problem}")


def node_ids(n: int) -> list[str]:
    """The engines' node ids for ``n`` nodes: n000, n001, ... (wider from 1,000 nodes)."""
    width = max(3, len(str(n - 1)))
    return [f"n{i:0{width}d}" for i in range(n)]


@contextlib.contextmanager
def task_errors(scenario: Scenario) -> Iterator[None]:
    """The [task] mistakes only building the task finds (a node count a graph task does not
    have, an option the task does not take, an unreadable readings file) as ``file:line:
    task: ...`` errors, as every other scenario mistake is."""
    try:
        yield
    except ScenarioError:
        raise
    except ValueError as exc:
        raise scenario_error(scenario.source, scenario.text, "task", str(exc)) from None
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise scenario_error(scenario.source, scenario.text, "task.options", str(exc)) from None


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    nodes: int
    partition: str = "iid"
    alpha: float = 0.5
    lr: float | None = None
    """Learning rate of local training (None: the task's default)."""
    batch_size: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TrainingSpec:
    epochs: float = 1.0
    samples_per_s: float = 2000.0
    """Modelled compute speed: a training of n samples takes n / samples_per_s virtual seconds."""
    speed_spread: float = 0.0
    """Node speeds are drawn uniformly in [1 - spread, 1 + spread] times samples_per_s."""
    eval_interval: float = 10.0
    eval_nodes: int = 0
    """Evaluate this many nodes (a fixed sample by seed) at each point; 0 = all."""
    path: str = "task"
    """"task": the learning core's training loop; "vectorized": numpy, digits-logreg only."""
    lr_schedule: str = "constant"
    """"cosine": each node's learning rate falls from lr to lr * lr_final over its planned
    trainings (stop.rounds of the setup, else stop.time); "constant": no schedule."""
    lr_final: float = 0.1
    keep_optimizer: bool = False
    """Keep each node's Adam moments from one local training to the next (default: fresh)."""

    def lr_scale(self, progress: float) -> float:
        """The factor on the learning rate at ``progress`` (0..1) of a node's run."""
        return schedule_scale(self.lr_schedule, self.lr_final, progress)

    def setup_keys(self) -> dict[str, Any]:
        """These keys as learning setup keys (``[[setup]]`` defaults): those not at default."""
        keys: dict[str, Any] = {}
        if self.lr_schedule != "constant":
            keys.update(lr_schedule=self.lr_schedule, lr_final=self.lr_final)
        if self.keep_optimizer:
            keys["keep_optimizer"] = True
        return keys


@dataclass(frozen=True, slots=True)
class PartitionSpec:
    start: float
    end: float
    groups: int


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    latency_ms: float = 10.0
    bandwidth_mbps: float = 100.0
    loss: float = 0.0
    detect_s: float = 2.0
    topology: str = "full"
    degree: int = 8
    partitions: tuple[PartitionSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class ChurnSpec:
    fraction: float = 0.0
    start: float = 0.0
    end: float = 0.0
    downtime: float = 30.0


@dataclass(frozen=True, slots=True)
class LiveSpec:
    replay_speed: float = 0.0
    """Graph tasks, processes engine: every daemon runs with ``[data] replay_speed`` (5-minute
    steps per wall-clock second; 0: off): it replays its readings, pushes each new step to the
    cloudlets that subscribed, forecasts its sensors live, and its rolling forecast MAE at the
    end is in the results (node ``extra.live``). The virtual engine refuses it (no wall clock)."""


@dataclass(frozen=True, slots=True)
class StopSpec:
    time: float
    rounds: int | None = None
    megabytes: float | None = None


@dataclass(frozen=True, slots=True)
class SetupSpec:
    """One ``[[setup]]``: its name, its own stop condition, and the learning setup it describes
    (``learning``: the one description the daemon reads too; None for "centralized")."""

    name: str
    protocol: str
    learning: LearningSetup | None = None
    epochs: float | None = None
    """The setup's own ``epochs`` key (None: [training] epochs); ``learning.epochs`` is the
    budget in effect."""
    stop: StopSpec | None = None

    @property
    def aggregation(self) -> str:
        return self.learning.rule if self.learning is not None else "-"

    @property
    def neighbours(self) -> str:
        return self.learning.neighbours if self.learning is not None else "all"

    @property
    def range_km(self) -> float | None:
        return self.learning.range_km if self.learning is not None else None

    @property
    def codec(self) -> str:
        return self.learning.codec if self.learning is not None else "fp32"

    @property
    def aggregator(self) -> str | None:
        return self.learning.aggregator if self.learning is not None else None


SCENARIO_DEFAULTS: dict[str, dict[str, Any]] = {
    "gossip": {"aggregation": "mean", "period": 5.0},
    "server-free": {"aggregation": "mean"},
    "fedavg": {"aggregation": "mean"},
}
"""Where a scenario's defaults differ from the protocol's (a daemon's): the plain mean, so the
rules are compared only when asked for, and a 5 s gossip period. The processes engine writes
them into each daemon's configuration like every other key."""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    seed: int
    task: TaskSpec
    training: TrainingSpec
    network: NetworkSpec
    churn: ChurnSpec
    stop: StopSpec
    setups: tuple[SetupSpec, ...]
    source: str = "<memory>"
    description: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)
    text: str | None = field(default=None, repr=False, compare=False)
    """The file's text, for the lines of errors found after parsing."""
    attacks: tuple[AttackSpec, ...] = ()
    """The ``[[attack]]`` tables (``p2pfl.sim.attacks``)."""
    live: LiveSpec = field(default_factory=LiveSpec)


class _Reader:
    """Typed access to one TOML table that remembers which keys were used."""

    def __init__(
        self, source: str, table: Mapping[str, Any], prefix: str, text: str | None = None
    ) -> None:
        self.source, self.table, self.prefix, self.text = source, table, prefix, text
        self.used: set[str] = set()

    def error(self, key: str, problem: str) -> ScenarioError:
        return scenario_error(self.source, self.text, f"{self.prefix}{key}", problem)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.error(key, "is required")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"must be {names}, got {value!r}")
        return value

    def number(
        self,
        key: str,
        default: Any = ...,
        *,
        low: float = -math.inf,
        high: float = math.inf,
        open_high: bool = False,
    ) -> Any:
        value = self.get(key, float, default)
        if value is None or value is default:
            return value
        if not (low <= value and (value < high if open_high else value <= high)):
            bracket = ")" if open_high else "]"
            raise self.error(key, f"must be in [{low}, {high}{bracket}, got {value}")
        return value

    def integer(self, key: str, default: Any = ..., *, low: int = 0) -> Any:
        value = self.get(key, int, default)
        if value is not None and value is not default and value < low:
            raise self.error(key, f"must be at least {low}, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value is not default and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def table_of(self, key: str) -> Mapping[str, Any]:
        return self.get(key, dict, {})  # type: ignore[no-any-return]

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key (a typo?); see simulations/README.md")


def _stop(source: str, text: str | None, table: Mapping[str, Any], prefix: str) -> StopSpec:
    r = _Reader(source, table, prefix, text)
    stop = StopSpec(
        time=r.number("time"),
        rounds=r.integer("rounds", None, low=1),
        megabytes=r.number("megabytes", None, low=0.0),
    )
    if not 0 < stop.time < math.inf:
        raise r.error("time", f"must be a positive, finite number of seconds, got {stop.time}")
    r.done()
    return stop


def _setup(
    source: str, text: str | None, table: Any, index: int, training: TrainingSpec, stop: StopSpec
) -> SetupSpec:
    """One [[setup]]: name, stop and protocol are the scenario's; every other key is the
    learning setup's, checked by its one validator (``p2pfl.learning.setup``)."""
    prefix = f"setup[{index}]."
    if not isinstance(table, dict):
        raise scenario_error(source, text, f"setup[{index}]", "must be a table")
    r = _Reader(source, table, prefix, text)
    name = r.get("name", str)
    protocol = r.choice("protocol", PROTOCOLS)
    own_stop = (
        _stop(source, text, r.table_of("stop"), prefix + "stop.") if "stop" in table else None
    )
    epochs = r.number("epochs", None, low=1e-9)
    if r.table.get("neighbours") == "task":
        raise r.error(
            "neighbours",
            '"task" is now called "range" (the nodes within range_km of each other; a graph '
            'task\'s cloudlets by default within its own range); write neighbours = "range"',
        )
    if "max_rounds" in table:
        raise r.error("max_rounds", "a scenario sets it with stop.rounds; write that instead")
    keys = {k: v for k, v in table.items() if k not in ("name", "protocol", "stop", "epochs")}
    if protocol == "centralized":
        for key in sorted(keys):
            what = "sends no models" if key == "codec" else "has no such setting"
            if key in TRAINING_KEYS:
                raise r.error(key, "the baseline reads it from [training]; set it there")
            if key in SETUP_KEYS:
                raise r.error(key, f"centralized training {what}; remove the key")
        r.done()
        return SetupSpec(name=name, protocol=protocol, epochs=epochs, stop=own_stop)
    r.used.update(keys)
    r.done()
    if "protocol" in keys:
        raise r.error("protocol", "is given once")
    rounds = (own_stop or stop).rounds
    values = {
        **SCENARIO_DEFAULTS[protocol],
        **_training_defaults(training, keys),
        **keys,
        "protocol": protocol,
        "epochs": epochs if epochs is not None else training.epochs,
        **({"max_rounds": rounds} if rounds is not None else {}),
    }
    try:
        learning = parse_setup(values)
    except SetupError as exc:
        raise r.error(exc.key, exc.problem) from None
    return SetupSpec(name=name, protocol=protocol, learning=learning, epochs=epochs, stop=own_stop)


def _training_defaults(training: TrainingSpec, keys: Mapping[str, Any]) -> dict[str, Any]:
    """[training]'s schedule and optimizer keys as a setup's defaults; a setup that sets its
    own lr_schedule takes its own lr_final too."""
    defaults = training.setup_keys()
    if "lr_schedule" in keys:
        defaults.pop("lr_final", None)
    return defaults


def parse_scenario(
    data: Mapping[str, Any], source: str = "<memory>", text: str | None = None
) -> Scenario:
    """Check and convert a parsed TOML document; raises ``ScenarioError`` naming the key (and
    its line, given the document's ``text``)."""
    top = _Reader(source, data, "", text)
    name = top.get("name", str)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise top.error("name", f"{name!r} names the results folder out/NAME: no path in it")
    seed = top.integer("seed", 0)
    description = top.get("description", str, "")

    t = _Reader(source, top.get("task", dict), "task.", text)
    task = TaskSpec(
        name=t.choice("name", TASKS),
        nodes=t.integer("nodes", low=1),
        partition=t.choice("partition", ("iid", "dirichlet", "quantity"), "iid"),
        alpha=t.number("alpha", 0.5, low=1e-9),
        lr=t.number("lr", None, low=1e-12),
        batch_size=t.integer("batch_size", None, low=1),
        options=dict(t.table_of("options")),
    )
    if (problem := partition_problem(task.name, task.partition)) is not None:
        raise t.error("partition", problem)
    t.done()

    tr = _Reader(source, top.table_of("training"), "training.", text)
    training = TrainingSpec(
        epochs=tr.number("epochs", 1.0, low=1e-9),
        samples_per_s=tr.number("samples_per_s", 2000.0, low=1e-9),
        speed_spread=tr.number("speed_spread", 0.0, low=0.0, high=1.0, open_high=True),
        eval_interval=tr.number("eval_interval", 10.0, low=1e-6),
        eval_nodes=tr.integer("eval_nodes", 0),
        path=tr.choice("path", TRAINING_PATHS, "task"),
        lr_schedule=tr.choice("lr_schedule", ("constant", "cosine"), "constant"),
        lr_final=tr.number("lr_final", 0.1, low=0.0, high=1.0),
        keep_optimizer=tr.get("keep_optimizer", bool, False),
    )
    if "lr_final" in tr.table and training.lr_schedule != "cosine":
        raise tr.error(
            "lr_final", 'applies only with lr_schedule = "cosine"; remove it or set that'
        )
    tr.done()

    n = _Reader(source, top.table_of("network"), "network.", text)
    partitions = []
    for i, p in enumerate(n.get("partitions", list, [])):
        if not isinstance(p, dict):
            raise n.error(f"partitions[{i}]", "must be a table with start, end, groups")
        pr = _Reader(source, p, f"network.partitions[{i}].", text)
        spec = PartitionSpec(
            pr.number("start", low=0.0), pr.number("end", low=0.0), pr.integer("groups", 2, low=2)
        )
        if spec.end <= spec.start:
            raise pr.error("end", f"must be after start ({spec.start}), got {spec.end}")
        pr.done()
        partitions.append(spec)
    network = NetworkSpec(
        latency_ms=n.number("latency_ms", 10.0, low=0.0),
        bandwidth_mbps=n.number("bandwidth_mbps", 100.0, low=1e-9),
        loss=n.number("loss", 0.0, low=0.0, high=1.0, open_high=True),
        detect_s=n.number("detect_s", 2.0, low=0.0),
        topology=n.choice("topology", ("full", "random"), "full"),
        degree=n.integer("degree", 8, low=1),
        partitions=tuple(partitions),
    )
    n.done()

    c = _Reader(source, top.table_of("churn"), "churn.", text)
    churn = ChurnSpec(
        fraction=c.number("fraction", 0.0, low=0.0, high=1.0),
        start=c.number("start", 0.0, low=0.0),
        end=c.number("end", 0.0, low=0.0),
        downtime=c.number("downtime", 30.0, low=0.0),
    )
    if churn.fraction > 0 and churn.end < churn.start:
        raise c.error("end", f"must not be before churn.start ({churn.start})")
    c.done()

    lv = _Reader(source, top.table_of("live"), "live.", text)
    live = LiveSpec(replay_speed=lv.number("replay_speed", 0.0, low=0.0))
    if live.replay_speed > 0 and not task.name.startswith("traffic-"):
        raise lv.error(
            "replay_speed", f"live replay needs a graph task (traffic-*), not {task.name!r}"
        )
    lv.done()

    stop = _stop(source, text, top.get("stop", dict), "stop.")
    raw_setups = top.get("setup", list)
    if not raw_setups:
        raise top.error("setup", "needs at least one [[setup]] table")
    setups = tuple(_setup(source, text, s, i, training, stop) for i, s in enumerate(raw_setups))
    names = [s.name for s in setups]
    for i, s in enumerate(names):
        if s in names[:i]:
            raise scenario_error(
                source, text, f"setup[{i}].name", f"{s!r} is used twice; names must differ"
            )
    ids = node_ids(task.nodes)
    for i, setup in enumerate(setups):
        if setup.aggregator is not None and setup.aggregator not in ids:
            raise scenario_error(
                source,
                text,
                f"setup[{i}].aggregator",
                f"{setup.aggregator!r} is not a node id; ids are {ids[0]}..{ids[-1]}",
            )
    top.used.add("attack")  # [[attack]]: its own module
    attacks = parse_attacks(data, source, names, task.nodes, ScenarioError, text=text)
    top.done()
    return Scenario(
        name=name,
        seed=seed,
        task=task,
        training=training,
        network=network,
        churn=churn,
        stop=stop,
        setups=setups,
        source=source,
        description=description,
        raw=data,
        text=text,
        attacks=attacks,
        live=live,
    )


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario file; errors name the file and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the scenario file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {exc.start}): not a TOML file") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
    return parse_scenario(data, str(path), text)
