"""Rounds to a target accuracy for each setup of a results folder (bounded views vs full mesh).

Usage: .venv/bin/python simulations/results/views_tables.py FOLDER TARGET [BASELINE]
Prints a markdown table: per setup, the first evaluation point whose mean accuracy (of the
evaluated nodes) reaches TARGET, as the mean round of those nodes there (rounds: trainings per
node), and its ratio to BASELINE's (default: the first setup). Also the final accuracy, the
traffic and, for setups with max_peers, the largest view any evaluated node held.
"""

from __future__ import annotations

import sys
from pathlib import Path

from p2pfl.sim.results import load_results


def rounds_to(curve: list[dict[str, float]], target: float) -> float | None:
    for point in curve:
        if point["accuracy"] >= target:
            return point["round"]
    return None


def main(folder: Path, target: float, baseline: str | None) -> None:
    results = load_results(folder / "results.json")
    setups = {s.name: s for s in results.setups}
    base = setups[baseline or results.setups[0].name]
    base_rounds = rounds_to(base.curve, target)
    print(
        f"| setup | rounds to {target:.2f} | vs {base.name} | final accuracy | MB sent | "
        "largest view |"
    )
    print("|---|---|---|---|---|---|")
    for s in results.setups:
        r = rounds_to(s.curve, target)
        ratio = f"{r / base_rounds:.3f}" if r is not None and base_rounds else "-"
        views = [n.extra["largest_view"] for n in s.nodes if "largest_view" in n.extra]
        largest = str(max(views)) if views else "all links"
        print(
            f"| {s.name} | {'not reached' if r is None else f'{r:.1f}'} | {ratio} | "
            f"{s.final['accuracy']:.4f} | {s.bytes_sent / 1e6:.1f} | {largest} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
