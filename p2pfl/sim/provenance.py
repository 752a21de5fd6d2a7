"""Where a results folder came from: the commit, the exact command and the package versions.

Results are reproducible or they are not results: every ``p2pfl simulate`` writes
``provenance.json`` next to ``results.json``, so a committed folder says which code produced it
and how to produce it again (``tests/sim/test_committed_results.py`` re-runs the small digits
experiment and compares).
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["PACKAGES", "provenance", "write_provenance"]

MAX_PATHS = 50

PACKAGES = ("p2pfl-edge", "torch", "numpy", "trio", "aiortc", "zeroconf", "msgpack", "cryptography")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def provenance(argv: list[str], *, source: Path | None = None) -> dict[str, object]:
    """The record for a run started as ``argv`` from the checkout holding ``source``."""
    where = source if source is not None else Path(__file__).resolve().parents[2]
    commit = _git("rev-parse", "HEAD", cwd=where)
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=where)
    changed = _git("diff", "--name-only", "HEAD", cwd=where) if dirty else None
    paths = sorted(changed.splitlines()) if changed else []
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": shlex.join(["p2pfl", *argv]),
        "commit": commit,
        "uncommitted_changes": bool(dirty) if dirty is not None else None,
        # which tracked files differed from the commit (a results folder written by an earlier
        # run is harmless; a changed source file means the commit is not the whole story)
        "uncommitted_paths": paths[:MAX_PATHS]
        + ([f"... {len(paths) - MAX_PATHS} more"] if len(paths) > MAX_PATHS else []),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def write_provenance(
    out_dir: Path, argv: list[str] | None = None, *, record: dict[str, object] | None = None
) -> Path:
    """Write ``provenance.json``: ``record`` (taken before the run wrote anything, so its own
    output does not count as an uncommitted change), else one for ``argv`` (``sys.argv``)."""
    if record is None:
        record = provenance(sys.argv[1:] if argv is None else argv)
    path = out_dir / "provenance.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path
