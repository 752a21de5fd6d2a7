"""Summary tables: a missing figure is a dash, virtual-only columns only for the virtual engine,
rounds as the counts they are; per-node bytes as bars from zero."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from p2pfl.sim.results import (
    MISSING,
    NodeResult,
    Results,
    SetupResult,
    bytes_per_node_figure,
    format_cell,
    markdown_table,
    table_columns,
    write_results,
)


def processes_results(rounds: tuple[int, ...] = (3,), engine: str = "processes") -> Results:
    nodes = [
        NodeResult(f"n{i}", {"accuracy": 0.9}, [], bytes_sent=1000 + 40 * i, bytes_received=900,
                   rounds=r)
        for i, r in enumerate(rounds)
    ]  # fmt: skip
    setup = SetupResult(
        name="gossip",
        protocol="gossip",
        aggregation="mean",
        final={"accuracy": 0.9},
        curve=[],
        nodes=nodes,
        bytes_sent=sum(n.bytes_sent for n in nodes),
        bytes_received=900,
        virtual_time_s=None if engine == "processes" else 40.0,
        wall_time_s=12.5,
    )
    return Results("s", engine, 0, "digits-logreg", "accuracy", True, [setup])


def test_missing_figure_is_an_em_dash_not_none() -> None:
    assert format_cell(None) == MISSING == "\u2014"
    assert format_cell(0.123456) == "0.1235"
    assert format_cell(12.34, ".1f") == "12.3"
    assert format_cell("gossip") == "gossip"


def test_processes_markdown_table_has_no_virtual_time_and_whole_rounds() -> None:
    table = markdown_table(processes_results(rounds=(40, 41, 43)))
    head, _, row = table.splitlines()[:3]
    assert head == "| setup | protocol | rounds | MB sent | accuracy |"
    assert row == "| gossip | gossip | 40\u201343 | 0.0 | 0.9 |"
    assert "None" not in table and MISSING not in table


def test_virtual_markdown_table_keeps_virtual_time_and_equal_rounds_are_one_number() -> None:
    table = markdown_table(processes_results(rounds=(12, 12), engine="virtual"))
    head, _, row = table.splitlines()[:3]
    assert head == "| setup | protocol | rounds | MB sent | virtual s | accuracy |"
    assert row == "| gossip | gossip | 12 | 0.0 | 40.0 | 0.9 |"


def test_table_columns_leave_virtual_time_to_the_virtual_engine() -> None:
    assert table_columns(processes_results()) == ["nodes", "rounds", "mb_sent", "wall_s"]
    assert "virtual_s" in table_columns(processes_results(engine="virtual"))


def test_processes_summary_csv_has_no_virtual_time_column(tmp_path: Path) -> None:
    write_results(processes_results(), tmp_path)
    text = (tmp_path / "summary.csv").read_text()
    assert "None" not in text
    header = text.splitlines()[0].split(",")
    assert "virtual_s" not in header and "rounds" in header


def test_bytes_per_node_is_a_bar_chart_from_zero() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    results = processes_results(rounds=(3, 3, 3, 3))
    results.setups.append(dataclasses.replace(results.setups[0], name="fedavg"))
    fig = bytes_per_node_figure(results)
    try:
        (ax,) = fig.axes
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(bars) == 8  # one bar per node and setup
        assert len(ax.lines) == 0  # no line chart
        assert ax.get_ylim()[0] == 0  # the axis is not cut: 4 % looks like 4 %
        heights = sorted({round(b.get_height(), 6) for b in bars})
        assert heights == [0.001, 0.00104, 0.00108, 0.00112]  # MB sent, every node shown
    finally:
        plt.close(fig)
