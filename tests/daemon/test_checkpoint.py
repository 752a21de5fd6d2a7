"""Checkpoints: round trip, keep-N, corrupt files skipped, and SIGKILL mid-write never corrupts."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pfl.daemon.checkpoint import CheckpointStore, read_checkpoint


def test_saved_checkpoint_loads_back_with_its_digest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt", keep=3)
    saved = store.save(b"\x00model\xff" * 100, {"round": 7, "peers": ["a", "b"]}, now=1234.5)
    loaded, skipped = store.load_latest()
    assert skipped == []
    assert loaded is not None
    assert (loaded.seq, loaded.created, loaded.model, loaded.state) == (
        1,
        1234.5,
        b"\x00model\xff" * 100,
        {"round": 7, "peers": ["a", "b"]},
    )
    assert loaded.digest == saved.digest and len(loaded.digest) == 64
    assert stat.S_IMODE(loaded.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o700


def test_only_the_newest_keep_checkpoints_remain(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for i in range(5):
        store.save(bytes([i]), {"round": i}, now=float(i))
    assert [seq for seq, _ in store.paths()] == [4, 5]
    latest, _ = store.load_latest()
    assert latest is not None and latest.state == {"round": 4}


def test_no_checkpoint_loads_as_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "absent").load_latest() == (None, [])


def test_corrupt_newest_checkpoint_is_reported_and_skipped(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(b"old model", {"round": 1}, now=1.0)
    newest = store.save(b"new model", {"round": 2}, now=2.0)
    data = bytearray(newest.path.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the protocol state
    newest.path.write_bytes(bytes(data))
    loaded, skipped = store.load_latest()
    assert loaded is not None and loaded.model == b"old model"
    assert [(s.path, s.reason) for s in skipped] == [
        (newest.path, "digest mismatch (corrupt or truncated)")
    ]


def test_truncated_and_foreign_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    store.save(b"good", {"round": 1}, now=1.0)
    second = store.save(b"x" * 1000, {"round": 2}, now=2.0)
    second.path.write_bytes(second.path.read_bytes()[:500])
    (tmp_path / "ckpt-000000000003.p2c").write_bytes(b"hello, not a checkpoint")
    loaded, skipped = store.load_latest()
    assert loaded is not None and loaded.model == b"good"
    assert [s.reason for s in skipped] == [
        "not a p2pfl checkpoint (bad magic or truncated)",
        "digest mismatch (corrupt or truncated)",
    ]
    # The next save never reuses a sequence number, even a corrupt one's.
    assert store.save(b"next", {}, now=4.0).seq == 4


_WRITER = """
import sys, os
from pathlib import Path
from p2pfl.daemon.checkpoint import CheckpointStore
store = CheckpointStore(Path(sys.argv[1]), keep=3)
size = int(sys.argv[2])
print("ready", flush=True)
i = 0
while True:
    i += 1
    store.save(os.urandom(size), {"round": i, "pad": "x" * (i % 97)}, now=float(i))
"""


@pytest.mark.slow
def test_repeated_sigkill_mid_write_never_leaves_a_corrupt_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir(mode=0o700)
    rng = random.Random(6)
    last_seq = 0
    killed_mid_write = 0
    for _ in range(20):
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(directory), str(4 << 20)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        # Let it write a few, then kill it right as a temporary file shows up: inside a write.
        time.sleep(rng.uniform(0.02, 0.2))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            p.name.endswith(".tmp") for p in directory.iterdir()
        ):
            time.sleep(0.0005)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        leftovers = [p for p in directory.iterdir() if p.name.endswith(".tmp")]
        killed_mid_write += bool(leftovers)
        # Every complete-named file verifies; the newest one is the one loaded.
        store = CheckpointStore(directory, keep=3)
        for seq, path in store.paths():
            assert read_checkpoint(path, expected_seq=seq).seq == seq
        loaded, skipped = store.load_latest()
        assert skipped == []
        assert loaded is not None and loaded.seq >= last_seq
        assert loaded.seq == store.paths()[-1][0]
        assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
        last_seq = loaded.seq
    assert last_seq >= 5  # the writers made progress between kills
    assert killed_mid_write >= 5  # and the kills did land inside writes
