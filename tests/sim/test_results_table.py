"""Summary tables show a missing figure (e.g. virtual time of the processes engine) as a dash."""

from __future__ import annotations

from pathlib import Path

from p2pfl.sim.results import (
    MISSING,
    NodeResult,
    Results,
    SetupResult,
    format_cell,
    markdown_table,
    write_results,
)


def processes_results() -> Results:
    node = NodeResult("n0", {"accuracy": 0.9}, [], bytes_sent=1000, bytes_received=900, rounds=3)
    setup = SetupResult(
        name="gossip",
        protocol="gossip",
        aggregation="mean",
        final={"accuracy": 0.9},
        curve=[],
        nodes=[node],
        bytes_sent=1000,
        bytes_received=900,
        virtual_time_s=None,
        wall_time_s=12.5,
    )
    return Results("s", "processes", 0, "digits-logreg", "accuracy", True, [setup])


def test_missing_figure_is_an_em_dash_not_none() -> None:
    assert format_cell(None) == MISSING == "\u2014"
    assert format_cell(0.123456) == "0.1235"
    assert format_cell(12.34, ".1f") == "12.3"
    assert format_cell("gossip") == "gossip"


def test_markdown_table_shows_a_dash_for_missing_virtual_time() -> None:
    table = markdown_table(processes_results())
    row = table.splitlines()[2]
    assert row == f"| gossip | gossip | 3.0 | 0.0 | {MISSING} | 0.9 |"
    assert "None" not in table


def test_summary_csv_leaves_missing_virtual_time_blank(tmp_path: Path) -> None:
    write_results(processes_results(), tmp_path)
    text = (tmp_path / "summary.csv").read_text()
    assert "None" not in text
    header, row = text.splitlines()[:2]
    assert row.split(",")[header.split(",").index("virtual_s")] == ""
