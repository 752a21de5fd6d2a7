"""What only the virtual engine models is listed as not applied by the processes engine."""

from __future__ import annotations

import tomllib

from p2pfl.sim.processes import virtual_only
from p2pfl.sim.scenario import parse_scenario

BASE = """
name = "keys"
[task]
name = "digits-logreg"
nodes = 4
[stop]
time = 10.0
[[setup]]
name = "gossip"
protocol = "gossip"
[[setup]]
name = "server-free"
protocol = "server-free"
neighbours = "topology"
"""

MODELLED = """
[training]
samples_per_s = 500.0
speed_spread = 0.5
eval_nodes = 2
path = "vectorized"
[network]
detect_s = 0.5
topology = "random"
degree = 2
"""


def _listed(text: str) -> dict[str, list[str]]:
    scenario = parse_scenario(tomllib.loads(text), "keys.toml", text)
    return {setup.name: virtual_only(scenario, setup) for setup in scenario.setups}


def test_a_scenario_at_the_defaults_has_nothing_only_the_virtual_engine_models() -> None:
    assert _listed(BASE) == {"gossip": [], "server-free": []}


def test_every_key_only_the_virtual_engine_models_is_listed_where_it_is_set() -> None:
    listed = _listed(BASE + MODELLED)
    keys = ["training.samples_per_s", "training.speed_spread", "training.eval_nodes"]
    keys += ["training.path", "network.detect_s"]
    # Server-free with neighbours = "topology" follows the topology's links; gossip's daemons
    # connect to every member.
    assert listed["server-free"] == keys
    assert listed["gossip"][:-1] == keys and listed["gossip"][-1].startswith("network.topology")
