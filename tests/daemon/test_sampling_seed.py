"""[protocol] seed seeds the daemon's peer sampling, as its comment says (and the learner's)."""

from __future__ import annotations

import random
from pathlib import Path

from p2pfl.daemon.config import load_config
from p2pfl.identity import NodeIdentity


def _first_draw(root: Path, seed: int) -> tuple[str, float]:
    from p2pfl.daemon.node import Node, prepare

    path = root / f"p2pfl-{seed}.toml"
    path.write_text(
        f'[node]\nstate_dir = "{root / "state"}"\nruntime_dir = "{root}"\n'
        f'[trust]\nmode = "open"\n[protocol]\nseed = {seed}\n[limits]\nmax_peers = 4\n'
    )
    node = Node(prepare(load_config(path), check=True), config_path=path)
    links = node.sampled_links()
    assert links.max_peers == 4
    return node.identity.node_id, links.machine._rng.random()


def test_the_protocol_seed_seeds_peer_sampling(short_tmp: Path) -> None:
    (short_tmp / "state").mkdir()
    NodeIdentity.generate().save(short_tmp / "state")
    node_id, draw = _first_draw(short_tmp, 7)
    assert _first_draw(short_tmp, 7) == (node_id, draw)
    assert draw == random.Random(f"7:{node_id}:sampling").random()
    assert _first_draw(short_tmp, 8)[1] != draw
