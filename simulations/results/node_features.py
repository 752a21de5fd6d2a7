"""Node features per cloudlet for the road and the kernel graph, in the study's Table 6 units.

Usage: .venv/bin/python simulations/results/node_features.py

For METR-LA and PeMS-BAY (the packaged graphs, their 7 cloudlets of 8 km), with the halo taken
over each adjacency (``TrafficTask(adjacency=...)``, 2 hops as the model's Chebyshev K = 3 needs):
own and halo sensors per cloudlet, the halo readings a cloudlet receives and the subgraph it holds
(own + halo) in MB for the whole series (METR-LA 34,272 and PeMS-BAY 52,116 five-minute steps,
float32, as ``p2pfl.learning.features`` sends them), and the subgraph over own ratio, next to the
study's Table 6 (node-feature MB per cloudlet: centralized 0.68 / 1.61, distributed 3.69 / 9.44).
Only positions and cloudlets are read: no readings, no training.
"""

from __future__ import annotations

import numpy as np

from p2pfl.ml.partition import partition_cloudlets
from p2pfl.ml.traffic import load_graph

STEPS = {"metr-la": 34_272, "pems-bay": 52_116}
"""The published series' lengths (METR-LA: 4 months, PeMS-BAY: 6 months, 5-minute steps)."""
STUDY = {"metr-la": (0.68, 3.69), "pems-bay": (1.61, 9.44)}
"""Table 6 of the study: node-feature MB per cloudlet, centralized and distributed setups."""
BYTES = 4  # float32 per reading


def rows(graph_name: str) -> list[dict[str, object]]:
    graph = load_graph(graph_name)
    mb = STEPS[graph_name] * BYTES / 1e6  # one sensor's whole series
    out: list[dict[str, object]] = []
    for adjacency in ("road", "kernel"):
        weights = graph.adjacency(adjacency)
        degree = float(((weights != 0) | (weights.T != 0)).sum(axis=1).mean())
        part = partition_cloudlets(graph, adjacency=adjacency)
        own = np.array([len(m) for m in part.members])
        halo = np.array([len(h) for h in part.halos])
        out.append(
            {
                "graph": graph_name,
                "adjacency": adjacency,
                "degree": degree,
                "own": own,
                "halo": halo,
                "own_mb": own.mean() * mb,
                "halo_mb": halo * mb,
                "subgraph_mb": (own + halo) * mb,
                "ratio": float((own + halo).mean() / own.mean()),
            }
        )
    return out


def main() -> None:
    print(
        "| graph | adjacency | avg. degree | halo sensors per cloudlet (0..6) | halo MB received "
        "per cloudlet (min-max, mean) | own MB per cloudlet (mean) | subgraph MB per cloudlet "
        "(mean) | subgraph / own | study: distributed / centralized MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("metr-la", "pems-bay"):
        central, distributed = STUDY[name]
        for r in rows(name):
            halo_mb = r["halo_mb"]
            sub_mb = r["subgraph_mb"]
            assert isinstance(halo_mb, np.ndarray) and isinstance(sub_mb, np.ndarray)
            print(
                f"| {name} | {r['adjacency']} | {r['degree']:.1f} | "
                f"{', '.join(str(h) for h in r['halo'])} | "  # type: ignore[attr-defined]
                f"{halo_mb.min():.2f}-{halo_mb.max():.2f}, {halo_mb.mean():.2f} | "
                f"{r['own_mb']:.2f} | {sub_mb.mean():.2f} | {r['ratio']:.2f} | "
                f"{distributed} / {central} = {distributed / central:.2f} |"
            )


if __name__ == "__main__":
    main()
