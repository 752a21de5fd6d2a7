"""`p2pfl train` writes the centralized baseline's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfl.cli import main
from p2pfl.cli._train import new_run_dir


def test_train_command_writes_metrics_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["train", "--task", "digits-logreg", "--epochs", "3", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["task"] == "digits-logreg" and payload["parameters"] == 650
    assert payload["metrics"]["accuracy"] > 0.8
    assert payload["train"]["samples"] == 3 * 1437
    assert "accuracy" in result.output


def test_train_command_names_a_bad_readings_file(tmp_path: Path) -> None:
    bad = tmp_path / "speeds.npz"
    bad.write_bytes(b"not an npz")
    result = CliRunner().invoke(
        main, ["train", "--task", "traffic-metr-la", "--readings", str(bad), "--out", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "speeds.npz" in result.output


def test_train_without_out_writes_a_new_folder_in_the_user_data_dir_each_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    args = ["train", "--task", "digits-logreg", "--epochs", "0.2"]
    first = CliRunner().invoke(main, args)
    second = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    runs = sorted((tmp_path / "data" / "p2pfl" / "train").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("digits-logreg-") for r in runs)
    assert all((r / "metrics.json").exists() for r in runs)  # the first run is kept
    assert not (tmp_path / "runs").exists()  # nothing in the working directory
    assert f"wrote {runs[0] / 'metrics.json'}\n" in first.output
    assert "steps" in first.output and "eta" in first.output  # a progress bar with ETA


def test_train_refuses_an_out_folder_holding_an_earlier_run_before_training(
    tmp_path: Path,
) -> None:
    (tmp_path / "metrics.json").write_text('{"earlier": true}\n')
    result = CliRunner().invoke(main, ["train", "--task", "digits", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith(f"p2pfl: --out {tmp_path} already holds metrics.json")
    assert "parameters" not in result.output  # refused before loading or training anything
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"earlier": True}


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    first = new_run_dir(tmp_path, "digits", now)
    second = new_run_dir(tmp_path, "digits", now)
    assert first.name == "digits-20270115-080000" and second.name == "digits-20270115-080000-2"
    assert first.is_dir() and second.is_dir()
