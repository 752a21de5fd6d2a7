"""`p2pfl simulate`: progress, a results table, files; clear errors instead of tracebacks."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from p2pfl.cli import main

SCENARIO = """
name = "cli-tiny"
seed = 1
[task]
name = "digits-logreg"
nodes = 4
[training]
samples_per_s = 250.0
eval_interval = 5.0
[stop]
time = 8.0
[[setup]]
name = "gossip"
protocol = "gossip"
period = 1.0
"""


@pytest.mark.slow
def test_simulate_writes_results_and_prints_a_table(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["simulate", str(scenario), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "cli-tiny (virtual engine, seed 1)" in result.output
    assert "accuracy" in result.output
    assert (out / "results.json").exists() and (out / "metric_vs_time.png").exists()
    assert "eta" in result.output  # the progress bar estimates the time left
    lines = result.output.splitlines()
    header = [c.strip() for c in re.split("[│┃]", next(x for x in lines if "setup" in x))]
    row = [c.strip() for c in re.split("[│┃]", next(x for x in lines if "│ gossip" in x))]
    assert "virtual_s" in header  # the virtual engine has virtual time
    # Rounds are counts: "4", or "3–4" when nodes differ; never a fractional mean.
    assert re.fullmatch(r"\d+(–\d+)?", row[header.index("rounds")]), row


def test_scenario_mistake_is_one_clear_line(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO.replace("nodes = 4", "nodes = 4\nnodez = 5"))
    result = CliRunner().invoke(main, ["simulate", str(scenario)])
    assert result.exit_code == 2  # a mistake in a scenario file, like one in a configuration
    assert result.output.startswith("p2pfl: ")
    assert "task.nodez: unknown key" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("change", "says"),
    [
        # Refused by the setup's validator while the file is read...
        ('period = 1.0\naggregation = "krum"\nkrum_m = 2', ':17: setup[0].krum_m: the rule "krum"'),
        ("period = 1.0\nround_timeout = 2.0", ":16: setup[0].round_timeout: gossip does not"),
        ("period = 1.0\nmax_norm = -1.0", ":16: setup[0].max_norm: must be > 0"),
        # ... and by the engine, with the same form, for what needs the task (positions).
        ('protocol = "server-free"\nneighbours = "range"', ':15: setup[0].neighbours: "range"'),
    ],
)
def test_a_setup_mistake_is_one_line_with_file_line_and_key(
    tmp_path: Path, change: str, says: str
) -> None:
    scenario = tmp_path / "s.toml"
    text = SCENARIO.replace("period = 1.0", change)
    if "server-free" in change:
        text = text.replace('protocol = "gossip"\n', "")
    scenario.write_text(text)
    _assert_one_error_line(scenario, says)


def _assert_one_error_line(scenario: Path, says: str) -> None:
    """``p2pfl simulate`` exits 2 with one ``p2pfl: FILE:LINE: key: ...`` line (after the
    progress bar's, when the engine found it while setting up the run), no traceback."""
    out = scenario.parent / "o"
    result = CliRunner().invoke(main, ["simulate", str(scenario), "--out", str(out)])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("p2pfl: ")]
    assert len(error) == 1 and error[0].startswith(f"p2pfl: {scenario}{says}"), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ('name = "digits-logreg"\nnodes = 4\n[task.options]\nfoo = 1', ":7: task.options: "),
        ('name = "traffic-metr-la"\nnodes = 4', ":4: task: task 'traffic-metr-la' has one node"),
    ],
)
def test_a_task_mistake_found_building_the_task_is_one_line(
    tmp_path: Path, change: str, says: str
) -> None:
    # Found by the task itself once the engine builds it: file:line too, not a traceback.
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO.replace('name = "digits-logreg"\nnodes = 4', change))
    _assert_one_error_line(scenario, says)


def test_an_unusable_out_folder_is_refused_before_the_run(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "o"
    result = CliRunner().invoke(main, ["simulate", str(scenario), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"p2pfl: --out {out}: Not a directory; choose another")
    assert "gossip" not in result.output  # no setup ran


def test_the_printed_status_command_is_the_running_p2pfl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pfl.sim.processes import _p2pfl_command

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "p2pfl").write_text("#!/bin/sh\n")
    (bin_dir / "p2pfl").chmod(0o755)
    monkeypatch.setattr("sys.executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    assert _p2pfl_command() == ".venv/bin/p2pfl"  # `make demo` from the checkout
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert _p2pfl_command() == str(bin_dir / "p2pfl")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert _p2pfl_command() == "p2pfl"  # an activated venv
    (bin_dir / "p2pfl").unlink()
    assert _p2pfl_command() == f"{bin_dir / 'python'} -m p2pfl"


def test_the_processes_legend_describes_the_progress_line_it_stands_above(
    node_status: Callable[..., Any],
) -> None:
    from p2pfl.cli._simulate import PROCESSES_LEGEND
    from p2pfl.daemon.control import PeerStatus
    from p2pfl.sim.processes import _live_line

    peers = tuple(PeerStatus(f"{i}" * 52, "", "connected") for i in range(3))
    node = node_status(round=40, metric_value=0.953, peers=peers)
    assert _live_line([node, None]) == "n0 r40 0.953 p3 | n1 -"
    assert "n<i> r<round> <metric> p<peers>" in PROCESSES_LEGEND
    assert "'n<i> -' is a node that is down" in PROCESSES_LEGEND
