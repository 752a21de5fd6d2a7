"""Every command: one error style (`p2pfl: ...`) and one exit status per kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfl.cli import _errors, main
from p2pfl.daemon import config, node


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr


def test_exit_statuses_are_the_daemons_own_and_listed_in_help() -> None:
    assert _errors.EXIT_USAGE == config.EXIT_CONFIG
    assert _errors.EXIT_IDENTITY == node.EXIT_IDENTITY
    assert _errors.EXIT_DATA == node.EXIT_DATA
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for line in ("Exit status", "2    a mistake", "3    a key", "4    a data", "130  interrupted"):
        assert line in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "show"],  # --state-dir missing
        ["simulate", "--engine", "quantum", "s.toml"],
        ["federation", "admit", "--dir", "fed", "--node-key", "abc", "--name", "n", "--out", "c"],
        ["status", "--socket", "a", "--config", "b"],
        ["train", "--epochs", "nan"],
        ["train", "--task", "traffic-metr-la", "--days", "0"],
        ["train", "--threads", "-1"],
        ["train", "--device", "tpu"],
        ["nonsense"],
    ],
)
def test_usage_mistakes_exit_2_with_one_line(args: list[str]) -> None:
    code, err = _run(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pfl: "), err
    assert "--help" in lines[0] and "Error:" not in err and "Usage:" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["data", "split", "--synthetic", "1", "--out", "/dev/null/sub"],
        ["train", "--epochs", "0.01", "--out", "/dev/null/sub"],
    ],
)
def test_an_out_folder_that_cannot_be_made_exits_2_before_the_work(args: list[str]) -> None:
    code, err = _run(*args)
    assert code == 2
    assert err.strip() == "p2pfl: --out /dev/null/sub: Not a directory; choose another folder"


@pytest.mark.parametrize(
    "command", [["keys", "show", "--state-dir"], ["federation", "show", "--dir"]]
)
def test_missing_keys_exit_3_with_one_line(tmp_path: Path, command: list[str]) -> None:
    code, err = _run(*command, str(tmp_path))
    assert code == 3
    assert err.startswith("p2pfl: no key at ") and len(err.strip().splitlines()) == 1


def test_a_bad_data_file_exits_4(tmp_path: Path) -> None:
    readings = tmp_path / "speeds.csv"
    readings.write_text("not,a\nspeed,table\n")
    code, err = _run("train", "--task", "traffic-metr-la", "--readings", str(readings))
    assert code == 4, err
    assert err.startswith("p2pfl: ") and str(readings) in err


def test_a_daemon_that_is_not_running_exits_1(tmp_path: Path) -> None:
    code, err = _run("peers", "--socket", str(tmp_path / "control.sock"))
    assert code == 1
    assert err.startswith("p2pfl: p2pfl daemon is not running")
