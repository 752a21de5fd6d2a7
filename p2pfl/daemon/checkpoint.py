"""Checkpoints: the model (bytes from the wire tensor codec) and the protocol state (msgpack).

One file per checkpoint, ``ckpt-<seq>.p2c``, written with :func:`p2pfl.files.atomic_write` (temp
file, fsync, rename, fsync of the directory), so a file with that name is always complete: a crash
or SIGKILL mid-write leaves only a temporary file, removed on the next start. The newest ``keep``
files are kept. Every file carries a SHA-256 digest of its body; on start the newest file that
checks out is loaded and every newer one that does not (a disk error, a hand edit) is reported
and skipped, never loaded.

Layout: ``MAGIC (8) | sha256(body) (32) | body`` with
``body = header length (u32, big endian) | header (msgpack) | model bytes | state (msgpack)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from p2pfl.files import atomic_write

MAGIC = b"P2PFLCK1"
_NAME = re.compile(r"^ckpt-(\d{12})\.p2c$")
_TEMP = re.compile(r"^\.ckpt-\d{12}\.p2c\..*\.tmp$")  # atomic_write's temporary names
_HEADER_LIMIT = 4096
_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    created: float
    """Unix time the checkpoint was taken."""
    model: bytes
    state: dict[str, Any]
    digest: str
    """Hex SHA-256 of the file body: what `p2pfl status` shows to compare nodes and restarts."""
    path: Path


@dataclass(frozen=True, slots=True)
class SkippedCheckpoint:
    path: Path
    reason: str


class CheckpointStore:
    """Checkpoints in one directory, owned by one daemon (the node holds the state-dir lock)."""

    def __init__(self, directory: Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = directory
        self.keep = keep

    def paths(self) -> list[tuple[int, Path]]:
        """(seq, path) of every checkpoint file, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, model: bytes, state: dict[str, Any], *, now: float) -> Checkpoint:
        """Write a new checkpoint durably, then drop the oldest beyond ``keep``."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        existing = self.paths()
        seq = existing[-1][0] + 1 if existing else 1
        state_bytes = msgpack.packb(state, use_bin_type=True)
        header = msgpack.packb(
            {
                "version": _FORMAT_VERSION,
                "seq": seq,
                "created": now,
                "model_len": len(model),
                "state_len": len(state_bytes),
            },
            use_bin_type=True,
        )
        body = b"".join([struct.pack(">I", len(header)), header, model, state_bytes])
        digest = hashlib.sha256(body).digest()
        path = self.directory / f"ckpt-{seq:012d}.p2c"
        atomic_write(path, MAGIC + digest + body, mode=0o600)
        for _, old in existing[: max(0, len(existing) + 1 - self.keep)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return Checkpoint(seq, now, model, state, digest.hex(), path)

    def load_latest(self) -> tuple[Checkpoint | None, list[SkippedCheckpoint]]:
        """The newest valid checkpoint (None if there is none) and the newer ones that were not.

        Also removes temporary files left by a writer that died mid-write.
        """
        self._remove_stale_temporaries()
        skipped: list[SkippedCheckpoint] = []
        for seq, path in reversed(self.paths()):
            try:
                return read_checkpoint(path, expected_seq=seq), skipped
            except CheckpointError as exc:
                skipped.append(SkippedCheckpoint(path, exc.reason))
        return None, skipped

    def _remove_stale_temporaries(self) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if _TEMP.match(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


class CheckpointError(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def read_checkpoint(path: Path, *, expected_seq: int | None = None) -> Checkpoint:
    """Read and verify one checkpoint file; raise CheckpointError saying what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(path, f"unreadable ({exc.strerror})") from None
    if len(data) < len(MAGIC) + 32 + 4 or not data.startswith(MAGIC):
        raise CheckpointError(path, "not a p2pfl checkpoint (bad magic or truncated)")
    stored_digest = data[len(MAGIC) : len(MAGIC) + 32]
    body = memoryview(data)[len(MAGIC) + 32 :]
    if hashlib.sha256(body).digest() != stored_digest:
        raise CheckpointError(path, "digest mismatch (corrupt or truncated)")
    (header_len,) = struct.unpack_from(">I", body)
    if header_len > _HEADER_LIMIT or 4 + header_len > len(body):
        raise CheckpointError(path, "header length out of range")
    try:
        header = msgpack.unpackb(body[4 : 4 + header_len], raw=False)
        model_len = int(header["model_len"])
        state_len = int(header["state_len"])
        seq = int(header["seq"])
        created = float(header["created"])
        version = int(header["version"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise CheckpointError(path, f"bad header ({exc})") from None
    if version != _FORMAT_VERSION:
        raise CheckpointError(path, f"format version {version}, this p2pfl reads 1")
    if 4 + header_len + model_len + state_len != len(body):
        raise CheckpointError(path, "section lengths do not add up")
    if expected_seq is not None and seq != expected_seq:
        raise CheckpointError(path, f"sequence {seq} does not match its file name")
    model_start = 4 + header_len
    model = bytes(body[model_start : model_start + model_len])
    try:
        state = msgpack.unpackb(body[model_start + model_len :], raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CheckpointError(path, f"bad protocol state ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, "protocol state is not a map")
    return Checkpoint(seq, created, model, state, stored_digest.hex(), path)
