"""Every simulate run records where its results came from."""

from __future__ import annotations

import json
import subprocess
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


def test_provenance_names_the_tracked_files_that_differ_from_the_commit(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 1\n")
    git("add", "a.py", "b.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = provenance(["simulate"], source=tmp_path)
    assert clean["uncommitted_changes"] is False and clean["uncommitted_paths"] == []
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "new.py").write_text("untracked\n")  # untracked files are not the run's code
    dirty = provenance(["simulate"], source=tmp_path)
    assert dirty["uncommitted_changes"] is True and dirty["uncommitted_paths"] == ["b.py"]
