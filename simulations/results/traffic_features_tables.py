"""Tables for simulations/results/traffic-features/README.md.

    python simulations/results/traffic_features_tables.py simulations/results/traffic-features

Reads ``live/results.json`` (7 real daemons, processes engine, replay on) and
``virtual/results.json`` (the same setups in the virtual engine, with a centralized reference)
and prints: the study's Table 5 for both engines next to centralized, node-feature bytes per
cloudlet as counted on the wire by each engine, and each daemon's rolling live forecast MAE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HORIZONS = ("15", "30", "60")


def _node_extra(node: dict[str, Any], key: str) -> Any:
    return node.get(key, node.get("extra", {}).get(key))


def main(folder: Path) -> None:
    live = json.loads((folder / "live" / "results.json").read_text())
    virtual = json.loads((folder / "virtual" / "results.json").read_text())
    central = next(s for s in virtual["setups"] if s["protocol"] == "centralized")
    ref = central["final"]["mae_15"]
    columns = [f"{m} {h}" for h in HORIZONS for m in ("MAE", "RMSE", "WMAPE")]
    print(
        "| setup | engine | "
        + " | ".join(columns)
        + " | MAE 15 vs centralized | rounds | MB sent |"
    )
    print("|---|---|" + "---|" * (len(columns) + 3))
    rows = [(s, "virtual") for s in virtual["setups"]] + [(s, "processes") for s in live["setups"]]
    rows.sort(key=lambda r: (r[0]["name"] != "centralized", r[0]["name"], r[1]))
    for setup, engine in rows:
        final = setup["final"]
        cells = []
        for h in HORIZONS:
            cells += [f"{final[f'mae_{h}']:.3f}", f"{final[f'rmse_{h}']:.3f}"]
            cells.append(f"{100 * final[f'wmape_{h}']:.2f}%")
        rounds = min((n.get("rounds", 0) for n in setup["nodes"]), default=0)
        delta = 100 * (final["mae_15"] / ref - 1)
        print(
            f"| {setup['name']} | {engine} | "
            + " | ".join(cells)
            + f" | {delta:+.1f}% | {rounds:g} | {setup['bytes_sent'] / 1e6:.1f} |"
        )
    print()
    print(
        "| cloudlet | node-feature MB received, processes (server-free / gossip) "
        "| virtual (server-free / gossip) | live rolling MAE 15 / 30 / 60, server-free "
        "| gossip | newest halo reading age, s (max over owners) |"
    )
    print("|---|---|---|---|---|---|")
    by_name = {(e, s["name"]): s for e, r in (("p", live), ("v", virtual)) for s in r["setups"]}
    for i in range(len(live["setups"][0]["nodes"])):

        def mb(engine: str, name: str, i: int = i) -> str:
            nodes = by_name[(engine, name)]["nodes"]
            value = _node_extra(nodes[i], "feature_bytes_received")
            return "-" if value is None else f"{value / 1e6:.3f}"

        def rolling(name: str, i: int = i) -> tuple[str, float]:
            info = _node_extra(by_name[("p", name)]["nodes"][i], "live") or {}
            mae = info.get("mae", {})
            ages = list(info.get("halo_age_s", {}).values())
            text = " / ".join(f"{mae[h]:.2f}" if h in mae else "-" for h in HORIZONS)
            return text, max(ages, default=0.0)

        sf, sf_age = rolling("server-free")
        go, go_age = rolling("gossip")
        print(
            f"| {i} | {mb('p', 'server-free')} / {mb('p', 'gossip')} "
            f"| {mb('v', 'server-free')} / {mb('v', 'gossip')} | {sf} | {go} "
            f"| {max(sf_age, go_age):.2f} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
