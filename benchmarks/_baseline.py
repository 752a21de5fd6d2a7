"""A baseline revision beside the working tree: its p2pfl exported, and run in a fresh process.

``--baseline REV`` in the transport benchmarks exports REV's ``p2pfl`` package with ``git
archive`` and measures it alternately with the checkout. A process meant to run the baseline
gets ``PYTHONPATH`` set to the export and ``PYTHONSAFEPATH`` (the script's or the current
directory must not shadow the export), and what it imported is checked before a figure counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def export(revision: str, into: Path) -> Path:
    """``revision``'s ``p2pfl`` package, extracted under ``into``/baseline."""
    tree = into / "baseline"
    tree.mkdir()
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", revision, "p2pfl"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def variables(tree: Path) -> dict[str, str]:
    """What a process needs in its environment to import ``tree``'s p2pfl: ``python -m`` and
    ``python -c`` put the current directory (the checkout) before ``PYTHONPATH``, and
    PYTHONSAFEPATH (3.11) leaves it out."""
    return {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}


def env_for(tree: Path | None) -> dict[str, str]:
    """The environment of a process that imports ``tree``'s p2pfl (None: the checkout's)."""
    return dict(os.environ) if tree is None else {**os.environ, **variables(tree)}


def check_imported(where: str, tree: Path | None) -> None:
    """Exit unless ``where`` (a module file a baseline process imported) lies in ``tree``."""
    if tree is not None and not where.startswith(str(tree)):
        raise SystemExit(f"the baseline imports {where}, not the exported {tree}")


def run_in(tree: Path | None, module: str, call: str) -> str:
    """The last line ``call`` prints when run in a fresh process importing ``tree``'s p2pfl and
    the benchmark ``module`` (from this directory); exits if it imported another p2pfl."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import {module} as b, p2pfl; print(p2pfl.__file__); {call}"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env_for(tree),
    ).stdout.split()
    check_imported(out[0], tree)
    return out[-1]
