"""A scenario's ``[[attack]]`` tables: which nodes are insiders that lie, how, and from when.

::

    [[attack]]
    nodes = 0.2                  # a fraction of the nodes (drawn by seed), or ids ["n003", "n007"]
    kind = "ipm"                 # see p2pfl.learning.attacks.ATTACK_KINDS
    start = 0.0                  # seconds after a node starts (optional)
    start_round = 0              # completed rounds before the attack begins (optional)
    epsilon = 0.5                # the kind's parameters: magnitude, factor, z, epsilon, lead
    setups = ["gossip-ipm-mean"] # which [[setup]] tables it applies to (default: all)

Both engines apply it the same way: an attacker's protocol machine is the one the factory makes,
wrapped by ``learning.attacks.AttackingLearner`` (the processes engine runs it in a real daemon
built by ``p2pfl.sim.attacker``); label flipping poisons the attacker's training data. Attackers
are never evaluated: a setup's accuracy is that of its honest nodes. A fraction is drawn among
the nodes that are not FedAvg's aggregator (the server FedAvg trusts; by default the first node),
the same nodes for every setup. A setup has at most one attack.

Errors name the file, the line where it can be found and the dotted key:
``robustness.toml:31: attack[0].kind: must be one of ...``.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2pfl.learning.attacks import ATTACK_KINDS, Attack
from p2pfl.tomlkeys import where

_PARAMS = ("magnitude", "factor", "z", "epsilon", "lead")
_KEYS = frozenset({"nodes", "kind", "start", "start_round", "setups", *_PARAMS})


@dataclass(frozen=True, slots=True)
class AttackSpec:
    attack: Attack
    fraction: float | None = None
    """A fraction of the eligible nodes, drawn by the scenario seed (None: ``ids``)."""
    ids: tuple[int, ...] = ()
    """Explicit attackers, by node index (the scenario's "n003" is index 3)."""
    setups: tuple[str, ...] | None = None
    """The setups it applies to; None: all."""


class _Errors:
    def __init__(self, source: str, text: str | None, kind: Callable[[str], Exception]) -> None:
        self.source, self.text, self.kind = source, text, kind

    def __call__(self, index: int, key: str | None, problem: str) -> Exception:
        dotted = f"attack[{index}]" + (f".{key}" if key else "")
        return self.kind(f"{where(self.source, self.text, dotted)}: {dotted}: {problem}")


def parse_attacks(
    data: Mapping[str, Any],
    source: str,
    setup_names: Sequence[str],
    n_nodes: int,
    error_kind: Callable[[str], Exception] = ValueError,
    *,
    text: str | None = None,
) -> tuple[AttackSpec, ...]:
    """The ``[[attack]]`` tables of a scenario document; raises ``error_kind`` (the scenario
    loader passes its ``ScenarioError``); ``text``, the file's text, gives errors their line."""
    raw = data.get("attack", [])
    error = _Errors(source, text, error_kind)
    if not isinstance(raw, list):
        raise error(0, None, "must be an array of tables, written [[attack]]")
    specs = []
    for index, table in enumerate(raw):
        if not isinstance(table, dict):
            raise error(index, None, "must be a table, written [[attack]]")
        specs.append(_attack(table, index, error, setup_names, n_nodes))
    claimed: dict[str, int] = {}
    for index, spec in enumerate(specs):
        for name in spec.setups if spec.setups is not None else setup_names:
            if name in claimed:
                raise error(
                    index,
                    "setups",
                    f"setup {name!r} already has attack[{claimed[name]}]; a setup has at most "
                    "one attack: list it in one table's setups only",
                )
            claimed[name] = index
    return tuple(specs)


def _attack(
    table: Mapping[str, Any],
    index: int,
    error: _Errors,
    setup_names: Sequence[str],
    n_nodes: int,
) -> AttackSpec:
    for key in table:
        if key not in _KEYS:
            raise error(index, key, f"unknown key; known: {', '.join(sorted(_KEYS))}")
    kind = table.get("kind")
    if kind is None:
        raise error(index, "kind", f"is required; one of {', '.join(ATTACK_KINDS)}")
    if kind not in ATTACK_KINDS:
        raise error(index, "kind", f"must be one of {', '.join(ATTACK_KINDS)}; got {kind!r}")
    values: dict[str, Any] = {"kind": kind}
    for key in ("start", *_PARAMS):
        if key not in table:
            continue
        value = table[key]
        integer = key == "lead"
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if not ok or isinstance(value, bool):
            raise error(index, key, f"must be {'an integer' if integer else 'a number'}")
        values[key] = value if integer else float(value)
    if "start_round" in table:
        value = table["start_round"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise error(index, "start_round", "must be an integer")
        values["start_round"] = value
    try:
        attack = Attack(**values)
    except ValueError as exc:
        bad = next((k for k in values if str(exc).startswith(k)), None)
        if bad is None and "start" in str(exc):
            bad = "start" if "start" in values else "start_round"
        raise error(index, bad or "kind", str(exc)) from None
    fraction, ids = _nodes(table, index, error, n_nodes)
    setups = None
    if "setups" in table:
        names = table["setups"]
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise error(index, "setups", "must be a list of setup names")
        for name in names:
            if name not in setup_names:
                raise error(
                    index, "setups", f"no setup named {name!r}; known: {', '.join(setup_names)}"
                )
        setups = tuple(names)
    return AttackSpec(attack, fraction, ids, setups)


def _nodes(
    table: Mapping[str, Any], index: int, error: _Errors, n_nodes: int
) -> tuple[float | None, tuple[int, ...]]:
    if "nodes" not in table:
        raise error(index, "nodes", 'is required: a fraction (0.2) or node ids (["n003"])')
    nodes = table["nodes"]
    if isinstance(nodes, int | float) and not isinstance(nodes, bool):
        if not 0 < nodes < 1:
            raise error(index, "nodes", f"a fraction must be in (0, 1), got {nodes}")
        count = attacker_count(nodes, n_nodes)
        if count > n_nodes - 1:
            raise error(
                index,
                "nodes",
                f"{nodes} of {n_nodes} nodes is {count} attackers; at most {n_nodes - 1} can "
                "attack (one node is never drawn: FedAvg's aggregator, else n000)",
            )
        return float(nodes), ()
    if not isinstance(nodes, list) or not nodes:
        raise error(index, "nodes", 'must be a fraction (0.2) or a list of node ids (["n003"])')
    ids = []
    for node in nodes:
        match = re.fullmatch(r"n(\d+)", node) if isinstance(node, str) else None
        if match is None or int(match.group(1)) >= n_nodes:
            raise error(
                index, "nodes", f"{node!r} is not a node id; ids are n000..n{n_nodes - 1:03d}"
            )
        ids.append(int(match.group(1)))
    if len(set(ids)) != len(ids):
        raise error(index, "nodes", "a node is listed twice")
    if len(ids) == n_nodes:
        raise error(index, "nodes", "lists every node: leave at least one honest node to score")
    return None, tuple(sorted(ids))


def attacker_count(fraction: float, n_nodes: int) -> int:
    """How many of ``n_nodes`` attack for ``nodes = fraction``: rounded, at least one."""
    return max(1, round(fraction * n_nodes))


def attackers(scenario: Any, setup: Any) -> dict[int, Attack]:
    """The attackers of ``setup`` (node index -> attack); empty for a clean setup."""
    n = scenario.task.nodes
    if setup.protocol == "centralized":
        return {}
    for spec in getattr(scenario, "attacks", ()):
        if spec.setups is not None and setup.name not in spec.setups:
            continue
        if spec.fraction is None:
            return dict.fromkeys(spec.ids, spec.attack)
        eligible = [i for i in range(n) if i != _trusted(scenario)]
        count = attacker_count(spec.fraction, n)
        chosen = random.Random(f"{scenario.seed}:attackers").sample(eligible, count)
        return dict.fromkeys(sorted(chosen), spec.attack)
    return {}


def _trusted(scenario: Any) -> int:
    """FedAvg's aggregator (the first FedAvg setup's, else node 0): never drawn as an attacker."""
    for setup in scenario.setups:
        if setup.protocol == "fedavg" and setup.aggregator is not None:
            match = re.fullmatch(r"n(\d+)", setup.aggregator)
            if match is not None:
                return int(match.group(1))
    return 0


def describe(attackers_of: Mapping[int, Attack], ids: Sequence[str]) -> dict[str, Any]:
    """What a setup's results record about its attack (nothing for a clean setup)."""
    if not attackers_of:
        return {}
    attack = next(iter(attackers_of.values()))
    return {
        "attack": {
            k: v for k, v in dataclasses.asdict(attack).items() if v != _DEFAULTS[k] or k == "kind"
        },
        "attackers": [ids[i] for i in sorted(attackers_of)],
    }


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Attack)}


def poison_data(workload: Any, attackers_of: Mapping[int, Attack]) -> None:
    """Make the label-flip attackers of a setup train on flipped labels (the others honestly).

    The engine's workload is shared by the setups of a scenario, so every setup sets it."""
    flipped = frozenset(i for i, a in attackers_of.items() if a.kind == "label-flip")
    if hasattr(workload, "label_flipped"):
        workload.label_flipped = flipped
    elif flipped:
        raise ValueError("this workload cannot flip labels")
