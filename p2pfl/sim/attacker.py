"""A test-only build of the daemon that attacks: the shipped ``p2pfl run``, its machine wrapped.

Not part of the CLI and not reachable from it: the processes engine launches this module instead
of ``p2pfl run`` for the nodes a scenario's ``[[attack]]`` names (``p2pfl.sim.attacks``), and
tests may launch it directly::

    python -m p2pfl.sim.attacker ATTACK_JSON COLLUDERS_JSON --config p2pfl.toml

``ATTACK_JSON`` is a ``learning.attacks.Attack`` as a JSON object (``{"kind": "ipm", ...}``),
``COLLUDERS_JSON`` the other attackers' node ids. Everything else is the real daemon: its key,
certificate, transport, signing and checkpoints; only the protocol machine that
``daemon.node.build_machine`` returns is wrapped by ``AttackingLearner`` (the same wrapper the
virtual engine applies), and for label-flip the trainer's data has its labels flipped.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def install(attack_json: str, colluders_json: str) -> None:
    """Wrap what this process's daemon builds (called before the daemon starts)."""
    from p2pfl.daemon import node as daemon_node
    from p2pfl.daemon import trainer as daemon_trainer
    from p2pfl.learning.attacks import Attack, AttackingLearner, flip_labels

    attack = Attack(**json.loads(attack_json))
    colluders = [str(c) for c in json.loads(colluders_json)]
    honest_build = daemon_node.build_machine

    def build_machine(*args: Any, **kwargs: Any) -> Any:
        return AttackingLearner(honest_build(*args, **kwargs), attack, colluders=colluders)

    daemon_node.build_machine = build_machine
    if attack.kind == "label-flip":
        honest_init = daemon_trainer.NodeTrainer.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            honest_init(self, *args, **kwargs)
            self.data = flip_labels(self.data)

        daemon_trainer.NodeTrainer.__init__ = init  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        sys.exit("usage: python -m p2pfl.sim.attacker ATTACK_JSON COLLUDERS_JSON --config FILE")
    install(args[0], args[1])
    from p2pfl.cli import main as cli

    cli(args=["run", *args[2:]])


if __name__ == "__main__":
    main()
