"""The distribution builds, and `p2pfl` is its only import name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_only_the_p2pfl_import_name(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("p2pfl_edge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"p2pfl"}
    assert "p2pfl/py.typed" in names
    assert "p2pfl/ml/data/digits.npz" in names  # the digits task reads it: no scikit-learn
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "p2pfl = p2pfl.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_cli_help_lists_no_heavy_imports() -> None:
    # `p2pfl --help` must not import torch or aiortc: operators run the CLI on small devices.
    code = (
        "import sys; from click.testing import CliRunner; from p2pfl.cli import main;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output;"
        "print(','.join(m for m in ('torch', 'aiortc', 'zeroconf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
