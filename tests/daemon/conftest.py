"""Shared fixtures for the daemon tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfl.sim.forkserver import ForkServer


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="p2pfl-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer]:
    """One fork server for the clusters of the whole run (``DaemonCluster(fork_server=...)``).

    It imports torch, aiortc and the daemon once (about 2.5 CPU-seconds) instead of once per
    cluster; every daemon is still forked into its own namespace and session with its own
    configuration, keys, sockets and log. A cluster starting its own server, and the exec
    launcher, are tested in test_forkserver.py.
    """
    root = Path(tempfile.mkdtemp(prefix="p2pfl-fs-", dir="/tmp"))
    try:
        with ForkServer(root, root / "forkserver.log") as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)
