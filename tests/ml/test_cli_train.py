"""`p2pfl train` writes the centralized baseline's metrics."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from p2pfl.cli import main


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
