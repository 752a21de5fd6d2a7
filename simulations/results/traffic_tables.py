"""Print the traffic experiment's tables (like the study's Tables 5 and 6) from results.json.

Usage: .venv/bin/python simulations/results/traffic_tables.py simulations/results/traffic-metr-la
"""

from __future__ import annotations

import sys
from pathlib import Path

from p2pfl.sim.results import load_results


def main(folder: Path) -> None:
    results = load_results(folder / "results.json")
    source = results.scenario_source
    default_epochs = float(source.get("training", {}).get("epochs", 1.0))
    # Local epochs per round / gossip tick: the setup's own `epochs` overrides the scenario's.
    setup_epochs = {
        t["name"]: float(t.get("epochs", default_epochs)) for t in source.get("setup", [])
    }
    central = next(s for s in results.setups if s.protocol == "centralized")
    print(
        "| setup | MAE 15 | RMSE 15 | WMAPE 15 | MAE 30 | RMSE 30 | WMAPE 30 | MAE 60 | RMSE 60 "
        "| WMAPE 60 | MAE 15 vs centralized |"
    )
    print("|---|" + "---|" * 10)
    for s in results.setups:
        f = s.final
        cells = [
            f"{f[f'{m}_{h}']:.3f}" if m != "wmape" else f"{100 * f[f'{m}_{h}']:.2f}%"
            for h in (15, 30, 60)
            for m in ("mae", "rmse", "wmape")
        ]
        delta = 100 * (f["mae_15"] / central.final["mae_15"] - 1)
        print(f"| {s.name} | " + " | ".join(cells) + f" | {delta:+.1f}% |")
    print()
    print(
        "| setup | rounds | local epochs per cloudlet | model MB sent (all cloudlets) "
        "| model MB sent per local epoch (all cloudlets) | per cloudlet (mean) "
        "| node-feature MB received per cloudlet (min-max) |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in results.setups:
        if s.protocol == "centralized":
            continue
        features = [n.extra["feature_bytes_received"] for n in s.nodes]
        # Feature readings travel once, before learning; their few message headers (< 10 KB)
        # stay in the model figure.
        model_bytes = s.bytes_sent - sum(n.extra["feature_bytes_sent"] for n in s.nodes)
        rounds = sum(n.rounds for n in s.nodes) / len(s.nodes)
        epochs = rounds * setup_epochs.get(s.name, default_epochs)
        per_epoch = model_bytes / epochs / 1e6
        print(
            f"| {s.name} | {rounds:.0f} | {epochs:.2f} | {model_bytes / 1e6:.2f} "
            f"| {per_epoch:.2f} | {per_epoch / len(s.nodes):.2f} "
            f"| {min(features) / 1e6:.3f}-{max(features) / 1e6:.3f} |"
        )
    model_mb = central.extra.get("model_bytes", 0) / 1e6
    print(f"\nmodel size: {model_mb:.3f} MB (fp32)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
