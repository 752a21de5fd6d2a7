"""Shared fixtures for the daemon tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="p2pfl-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
