"""atomic_write: the target holds the old or the new content, never a mix, never a stray temp."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.files import atomic_write


def test_atomic_write_creates_file_with_requested_mode(tmp_path: Path) -> None:
    target = tmp_path / "key"
    atomic_write(target, b"secret")
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(tmp_path / "public", b"x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_failure_before_rename_keeps_old_file_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.bin"
    atomic_write(target, b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fault injection: fsync of the temp file fails
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_process_killed_before_rename_leaves_old_file(tmp_path: Path) -> None:
    # A real crash: the child process dies (os._exit) at the moment it would rename.
    target = tmp_path / "state.bin"
    atomic_write(target, b"old")
    code = (
        "import os, sys; from pathlib import Path; from p2pfl.files import atomic_write;"
        "os.replace = lambda *a: os._exit(9);"
        "atomic_write(Path(sys.argv[1]), b'new' * 100000)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    assert result.returncode == 9
    assert target.read_bytes() == b"old"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "state.bin"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".state.bin.")  # the torn temp file
