"""Every simulate run records where its results came from."""

from __future__ import annotations

import json
from pathlib import Path

from p2pfl.sim.provenance import PACKAGES, provenance, write_provenance


def test_provenance_names_the_commit_the_command_and_the_versions(tmp_path: Path) -> None:
    record = provenance(["simulate", "s.toml", "--out", "x y"])
    assert record["command"] == "p2pfl simulate s.toml --out 'x y'"
    assert isinstance(record["commit"], str) and len(record["commit"]) == 40
    packages = record["packages"]
    assert isinstance(packages, dict) and set(packages) == set(PACKAGES)
    assert packages["torch"] and packages["numpy"]
    path = write_provenance(tmp_path, ["simulate", "s.toml"])
    assert json.loads(path.read_text())["command"] == "p2pfl simulate s.toml"
