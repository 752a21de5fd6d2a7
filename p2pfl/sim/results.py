"""The results format every engine writes, and its plots.

``write_results(results, out_dir)`` writes, for any engine (``virtual`` here, ``processes`` in
the daemon's harness):
- ``results.json``: the scenario, then per setup: final metrics (mean over nodes), the curve
  (time, mean round, bytes so far, mean metrics at each evaluation point), bytes sent/received,
  virtual and wall time, and per node: final metrics, history (time, round, bytes sent, metrics
  at each evaluation point), bytes sent/received and counters (``extra``);
- ``results.csv`` (one row per node and evaluation point) and ``summary.csv`` (one row per setup;
  ``virtual_s`` only for the virtual engine, the one that has virtual time);
- ``metric_vs_time.png`` (primary metric vs time, one line per setup), ``metric_vs_bytes.png``
  and ``bytes_per_node.png`` (a bar chart from zero: bytes sent by each node, one bar per setup).

Tables a person reads (the CLI's, :func:`markdown_table`) show rounds as the counts they are:
``12`` when every node did 12, ``11-14`` (an en dash) when nodes differ.
``load_results(path)`` reads ``results.json`` back. Output is deterministic: keys sorted, and with
``include_wall=False`` the wall-clock fields are left out so equal runs give equal bytes.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMAT = "p2pfl-sim-results/1"


@dataclass
class NodeResult:
    node: str
    final: dict[str, float]
    history: list[dict[str, float]]
    """Per evaluation point: time, round, bytes_sent, and the task's metrics."""
    bytes_sent: int
    bytes_received: int
    rounds: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SetupResult:
    name: str
    protocol: str
    aggregation: str
    final: dict[str, float]
    curve: list[dict[str, float]]
    """Per evaluation point: time, round (mean), bytes (all nodes so far), mean metrics."""
    nodes: list[NodeResult]
    bytes_sent: int
    bytes_received: int
    virtual_time_s: float | None
    wall_time_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    scenario: str
    engine: str
    seed: int
    task: str
    primary_metric: str
    higher_is_better: bool
    setups: list[SetupResult]
    scenario_source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT


def to_json(results: Results, *, include_wall: bool = True) -> str:
    data = asdict(results)
    if not include_wall:
        for setup in data["setups"]:
            setup.pop("wall_time_s")
    return json.dumps(data, sort_keys=True, indent=1, default=str) + "\n"


def load_results(path: Path) -> Results:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={data.get('format')!r})")
    setups = []
    for s in data.pop("setups"):
        nodes = [NodeResult(**n) for n in s.pop("nodes")]
        s.setdefault("wall_time_s", float("nan"))
        setups.append(SetupResult(nodes=nodes, **s))
    return Results(setups=setups, **data)


def _metric_names(results: Results) -> list[str]:
    names: set[str] = set()
    for setup in results.setups:
        names |= set(setup.final)
    return sorted(names)


MISSING = (
    "\u2014"  # em dash: a figure the engine does not measure (e.g. virtual time of real processes)
)


def format_cell(value: Any, spec: str = ".4g") -> str:
    """One table cell: floats with `spec`, a missing figure (None) as an em dash."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def summary_rows(results: Results) -> list[dict[str, Any]]:
    """One row per setup: what the CLI's table and summary.csv show."""
    rows = []
    for s in results.setups:
        row: dict[str, Any] = {
            "setup": s.name,
            "protocol": s.protocol,
            "aggregation": s.aggregation,
            "nodes": len(s.nodes),
            "rounds": sum(n.rounds for n in s.nodes) / max(len(s.nodes), 1),
            "rounds_min": min((n.rounds for n in s.nodes), default=0),
            "rounds_max": max((n.rounds for n in s.nodes), default=0),
            "mb_sent": s.bytes_sent / 1e6,
            "virtual_s": s.virtual_time_s,
            "wall_s": s.wall_time_s,
        }
        row.update(s.final)
        rows.append(row)
    return rows


def has_virtual_time(results: Results) -> bool:
    """Whether the engine measures virtual time (the virtual engine); else no such column."""
    return results.engine == "virtual"


def table_columns(results: Results) -> list[str]:
    """The figure columns a table of ``results`` shows, in order (metrics come after them)."""
    virtual = ["virtual_s"] if has_virtual_time(results) else []
    return ["nodes", "rounds", "mb_sent", *virtual, "wall_s"]


def format_rounds(row: dict[str, Any]) -> str:
    """Rounds are counts: ``12`` when every node did 12, ``11\u201314`` when nodes differ."""
    low, high = int(row["rounds_min"]), int(row["rounds_max"])
    return str(low) if low == high else f"{low}\u2013{high}"


def markdown_table(results: Results, metrics: list[str] | None = None) -> str:
    """The summary as a Markdown table (for experiment READMEs)."""
    rows = summary_rows(results)
    metrics = metrics or _metric_names(results)
    virtual = has_virtual_time(results)
    head = ["setup", "protocol", "rounds", "MB sent", *(["virtual s"] if virtual else []), *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["setup"],
            row["protocol"],
            format_rounds(row),
            format_cell(row["mb_sent"], ".1f"),
            *([format_cell(row["virtual_s"], ".1f")] if virtual else []),
            *(format_cell(row.get(m)) for m in metrics),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_results(results: Results, out_dir: Path, *, include_wall: bool = True) -> list[Path]:
    """Write results.json, results.csv, summary.csv and the plots; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = _metric_names(results)
    written = [out_dir / "results.json", out_dir / "results.csv", out_dir / "summary.csv"]
    written[0].write_text(to_json(results, include_wall=include_wall), encoding="utf-8")
    per_node = [
        {"setup": s.name, "node": n.node, **point}
        for s in results.setups
        for n in s.nodes
        for point in n.history
    ]
    columns = ["setup", "node", "time", "round", "bytes_sent", *metrics]
    written[1].write_text(_csv(per_node, columns), encoding="utf-8")
    summary_cols = [
        "setup",
        "protocol",
        "aggregation",
        "nodes",
        "rounds",
        "mb_sent",
        *(["virtual_s"] if has_virtual_time(results) else []),
        *(["wall_s"] if include_wall else []),
        *metrics,
    ]
    written[2].write_text(_csv(summary_rows(results), summary_cols), encoding="utf-8")
    written += plot_results(results, out_dir)
    return written


def plot_results(results: Results, out_dir: Path) -> list[Path]:
    """PNG plots: primary metric vs time and vs bytes (one line per setup); bytes per node."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results.primary_metric
    paths = []
    for x_key, x_label, scale, name in [
        (
            "time",
            "time (s, virtual)" if results.engine == "virtual" else "time (s)",
            1.0,
            "metric_vs_time.png",
        ),
        ("bytes", "traffic, all nodes (MB)", 1e-6, "metric_vs_bytes.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for s in results.setups:
            points = [p for p in s.curve if metric in p]
            if s.protocol == "centralized" and x_key == "bytes":
                if points:
                    ax.axhline(points[-1][metric], ls="--", color="gray", label=f"{s.name} (final)")
                continue
            ax.plot([p[x_key] * scale for p in points], [p[metric] for p in points], label=s.name)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} (mean over nodes)")
        ax.set_title(f"{results.scenario}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        paths.append(out_dir / name)

    fig = bytes_per_node_figure(results)
    fig.savefig(out_dir / "bytes_per_node.png")
    plt.close(fig)
    paths.append(out_dir / "bytes_per_node.png")
    return paths


def bytes_per_node_figure(results: Results) -> Figure:
    """Bytes sent by each node as bars from zero, side by side per setup.

    Bars, not a line: nodes are separate things, not points on a scale; and the axis starts at
    zero, so a 4 % difference between nodes looks like 4 %. Nodes are sorted by traffic within
    each setup (the shape of the spread is what matters, not which node is which).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = [s for s in results.setups if s.protocol != "centralized"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    width = 0.8 / max(len(setups), 1)
    for k, s in enumerate(setups):
        sent = sorted((n.bytes_sent / 1e6 for n in s.nodes), reverse=True)
        offset = (k - (len(setups) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(sent))], sent, width=width, label=s.name)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("node (sorted by traffic)")
    ax.set_ylabel("MB sent")
    ax.set_title(f"{results.scenario}: bytes sent per node")
    ax.grid(alpha=0.3, axis="y")
    if setups:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
