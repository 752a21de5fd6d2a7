"""The Byzantine experiment's table and plot (protocol x attack x rule) from results.json.

Usage: .venv/bin/python simulations/results/robustness_tables.py \
    simulations/results/robustness-byzantine [simulations/results/robustness-byzantine/seed1 ...]
One folder: prints a markdown table (honest nodes' accuracy; in brackets the change in points
from the clean run of the same protocol with plain "mean"). Several folders (one per seed):
each cell is the mean over the seeds +- the sample standard deviation, and the change is the
mean of each seed's change from its own clean "mean" run; a robust cell is marked * where that
mean change is within 2 points (>= -2.0). Where the runs have ``{protocol}-honest-only-mean``
setups (the attackers absent: ``[[attack]] kind = "absent"``), a robust cell also shows its
change from that honest-only run, marked + where within 2 points, and the table gets an
honest-only row. Writes ``accuracy_by_attack.png`` into the first folder (bars: mean over
seeds; whiskers: lowest and highest seed).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from p2pfl.sim.results import load_results

PROTOCOLS = ("gossip", "server-free", "fedavg")
RULES = ("mean", "robust")
HONEST = "honest-only"


def _accuracies(folder: Path) -> tuple[dict[str, float], list[str]]:
    results = load_results(folder / "results.json")
    acc = {s.name: s.final["accuracy"] for s in results.setups}
    attacks: list[str] = []
    for s in results.setups:
        kind = s.name.split("-", 1)[1].rsplit("-", 1)[0]
        kind = kind.removeprefix("free-")  # "server-free-..." splits one dash further
        if kind not in attacks and kind != HONEST:
            attacks.append(kind)
    return acc, attacks


def main(folders: list[Path]) -> None:
    runs = [_accuracies(f) for f in folders]
    attacks = runs[0][1]
    accs = [acc for acc, _ in runs]
    several = len(accs) > 1
    honest = all(f"{p}-{HONEST}-mean" in acc for p in PROTOCOLS for acc in accs)
    header = " | ".join(f"{p} {r}" for p in PROTOCOLS for r in RULES)
    print(f"| attack | {header} |")
    print("|---|" + "---:|" * (len(PROTOCOLS) * len(RULES)))
    met, missed, met_honest = [], [], []
    for attack in attacks:
        cells = []
        for p in PROTOCOLS:
            for r in RULES:
                name = f"{p}-{attack}-{r}"
                values = [acc[name] for acc in accs]
                deltas = [100 * (acc[name] - acc[f"{p}-clean-mean"]) for acc in accs]
                mean, delta = statistics.fmean(values), statistics.fmean(deltas)
                text = f"{mean:.3f}"
                if several:
                    text += f" ± {statistics.stdev(values):.3f}"
                if not (attack == "clean" and r == "mean"):
                    mark = "*" if several and r == "robust" and delta >= -2.0 else ""
                    if honest and r == "robust":
                        vs = statistics.fmean(
                            100 * (acc[name] - acc[f"{p}-{HONEST}-mean"]) for acc in accs
                        )
                        mark += "+" if several and vs >= -2.0 else ""
                        text += f" ({delta:+.1f} / {vs:+.1f}){mark}"
                        if attack != "clean" and vs >= -2.0:
                            met_honest.append(f"{p} {attack} {vs:+.1f}")
                    else:
                        text += f" ({delta:+.1f}){mark}"
                if r == "robust" and attack != "clean":
                    (met if delta >= -2.0 else missed).append(f"{p} {attack} {delta:+.1f}")
                cells.append(text)
        print(f"| {attack} | " + " | ".join(cells) + " |")
    if honest:
        cells = []
        for p in PROTOCOLS:
            name = f"{p}-{HONEST}-mean"
            values = [acc[name] for acc in accs]
            deltas = [100 * (acc[name] - acc[f"{p}-clean-mean"]) for acc in accs]
            text = f"{statistics.fmean(values):.3f}"
            if several:
                text += f" ± {statistics.stdev(values):.3f}"
            cells += [f"{text} ({statistics.fmean(deltas):+.1f})", ""]
        print(f"| {HONEST} (attackers absent), mean | " + " | ".join(cells) + " |")
    total = len(met) + len(missed)
    print(f"\nrobust within 2 points of clean: {len(met)} of {total}")
    print("met:    " + "; ".join(met))
    print("missed: " + "; ".join(missed))
    if honest:
        print(f"robust within 2 points of honest-only: {len(met_honest)} of {total}")
        print("met:    " + "; ".join(met_honest))
    _plot(folders[0], accs, attacks)


def _plot(folder: Path, accs: list[dict[str, float]], attacks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(15, 4.2), sharey=True)
    width = 0.38
    for ax, p in zip(axes, PROTOCOLS, strict=True):
        xs = range(len(attacks))
        for k, r in enumerate(RULES):
            per_seed = [[acc[f"{p}-{a}-{r}"] for acc in accs] for a in attacks]
            means = [statistics.fmean(v) for v in per_seed]
            low = [m - min(v) for m, v in zip(means, per_seed, strict=True)]
            high = [max(v) - m for m, v in zip(means, per_seed, strict=True)]
            ax.bar(
                [x + (k - 0.5) * width for x in xs],
                means,
                width,
                yerr=[low, high] if len(accs) > 1 else None,
                capsize=2,
                label=r,
            )
        clean = statistics.fmean(acc[f"{p}-clean-mean"] for acc in accs)
        ax.axhline(clean, color="k", lw=0.8, ls="--", label="clean, mean")
        if all(f"{p}-{HONEST}-mean" in acc for acc in accs):
            alone = statistics.fmean(acc[f"{p}-{HONEST}-mean"] for acc in accs)
            ax.axhline(alone, color="g", lw=0.8, ls=":", label="attackers absent, mean")
        ax.set_xticks(list(xs), attacks, rotation=40, ha="right")
        ax.set_title(p)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("honest nodes' accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    seeds = f", {len(accs)} seeds (whiskers: lowest / highest)" if len(accs) > 1 else ""
    fig.suptitle(f"16 nodes, digits Dirichlet 0.5, 3 insiders: plain mean vs robust rule{seeds}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(folder / "accuracy_by_attack.png", dpi=110)


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
