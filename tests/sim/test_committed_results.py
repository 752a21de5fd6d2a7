"""The committed digits experiment is what the code produces today (wall times aside).

When a change moves these numbers, re-run the experiment with the command in its
provenance.json, commit the new folder, and say in its README what moved and why.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "simulations" / "results" / "digits-10-noniid"


def _without_wall_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_wall_times(v) for k, v in value.items() if "wall" not in k}
    if isinstance(value, list):
        return [_without_wall_times(v) for v in value]
    return value


@pytest.mark.slow
def test_rerunning_the_committed_digits_experiment_gives_the_committed_results(
    tmp_path: Path,
) -> None:
    provenance = json.loads((FOLDER / "provenance.json").read_text())
    argv = shlex.split(provenance["command"])
    assert argv[:2] == ["p2pfl", "simulate"] and "--out" in argv
    argv[argv.index("--out") + 1] = str(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "p2pfl", *argv[1:]], cwd=ROOT, check=True, capture_output=True
    )
    committed = json.loads((FOLDER / "results.json").read_text())
    rerun = json.loads((tmp_path / "results.json").read_text())
    assert _without_wall_times(rerun) == _without_wall_times(committed)
