"""The Byzantine experiment's table and plot (protocol x attack x rule) from results.json.

Usage: .venv/bin/python simulations/results/robustness_tables.py \
    simulations/results/robustness-byzantine
Prints a markdown table (honest nodes' accuracy; in brackets the change from the clean run of the
same protocol with plain "mean") and writes ``accuracy_by_attack.png`` into the folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from p2pfl.sim.results import load_results

PROTOCOLS = ("gossip", "server-free", "fedavg")
RULES = ("mean", "robust")


def main(folder: Path) -> None:
    results = load_results(folder / "results.json")
    acc = {s.name: s.final["accuracy"] for s in results.setups}
    attacks: list[str] = []
    for s in results.setups:
        kind = s.name.split("-", 1)[1].rsplit("-", 1)[0]
        kind = kind.removeprefix("free-")  # "server-free-..." splits one dash further
        if kind not in attacks:
            attacks.append(kind)
    header = " | ".join(f"{p} {r}" for p in PROTOCOLS for r in RULES)
    print(f"| attack | {header} |")
    print("|---|" + "---:|" * (len(PROTOCOLS) * len(RULES)))
    for attack in attacks:
        cells = []
        for p in PROTOCOLS:
            clean = acc[f"{p}-clean-mean"]
            for r in RULES:
                value = acc[f"{p}-{attack}-{r}"]
                delta = 100 * (value - clean)
                cells.append(
                    f"{value:.3f}"
                    if attack == "clean" and r == "mean"
                    else f"{value:.3f} ({delta:+.1f})"
                )
        print(f"| {attack} | " + " | ".join(cells) + " |")
    _plot(folder, acc, attacks)


def _plot(folder: Path, acc: dict[str, float], attacks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(15, 4.2), sharey=True)
    width = 0.38
    for ax, p in zip(axes, PROTOCOLS, strict=True):
        xs = range(len(attacks))
        for k, r in enumerate(RULES):
            values = [acc[f"{p}-{a}-{r}"] for a in attacks]
            ax.bar([x + (k - 0.5) * width for x in xs], values, width, label=r)
        ax.axhline(acc[f"{p}-clean-mean"], color="k", lw=0.8, ls="--", label="clean, mean")
        ax.set_xticks(list(xs), attacks, rotation=40, ha="right")
        ax.set_title(p)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("honest nodes' accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=3, fontsize=9)
    fig.suptitle("16 nodes, digits Dirichlet 0.5, 3 insiders: plain mean vs robust rule")
    fig.tight_layout()
    fig.savefig(folder / "accuracy_by_attack.png", dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
