"""The sweep of stale namespaces judges only those made in our own PID namespace."""

from __future__ import annotations

import os
import subprocess

import pytest

from p2pfl.sim.netns import sweep_stale_namespaces


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.netns
def test_a_namespace_from_another_pid_namespace_is_not_swept_for_a_pid_it_cannot_judge() -> None:
    dead = _dead_pid()
    own = os.stat("/proc/self/ns/pid").st_ino
    foreign = f"p2pfl-{dead}-p{own + 1}-0sweep"  # a pid of another PID namespace: not ours
    stale = f"p2pfl-{dead}-p{own}-0sweep"  # made here by a process that is gone
    for name in (foreign, stale):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        swept = sweep_stale_namespaces()
        assert stale in swept and stale not in _namespaces()
        assert foreign not in swept and foreign in _namespaces()
    finally:
        for name in (foreign, stale):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
