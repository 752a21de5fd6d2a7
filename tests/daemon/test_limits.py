"""The descriptor budget sheds before the limit; the daemon raises its own soft limit."""

from __future__ import annotations

import os
import subprocess
import sys

from p2pfl.daemon.limits import DescriptorBudget


def _open_now() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_budget_is_near_the_limit_only_past_the_shed_fraction() -> None:
    base = _open_now()
    budget = DescriptorBudget(0.5, limit=2 * (base + 20))
    assert not budget.near_limit()
    files = [open(os.devnull, "rb") for _ in range(30)]  # noqa: SIM115 (closed below)
    try:
        budget._checked_at = -1.0  # the count is cached for 50 ms: look again now
        assert budget.near_limit()
    finally:
        for f in files:
            f.close()
    budget._checked_at = -1.0
    assert not budget.near_limit()


def test_a_low_numbered_new_descriptor_proves_room_without_counting() -> None:
    budget = DescriptorBudget(0.0001, limit=1000)  # would always be near the limit if counted
    assert not budget.near_limit(newest_fd=10)
    assert budget.near_limit(newest_fd=900)


def test_the_daemon_raises_its_soft_descriptor_limit_to_the_hard_one() -> None:
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))\n"
        "from p2pfl.daemon.limits import raise_nofile_limit\n"
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(4096, 4096) (4096, 4096)"


def test_a_burst_between_two_counts_cannot_overshoot_the_limit() -> None:
    base = _open_now()
    budget = DescriptorBudget(1.0, limit=base + 10)
    answers = [budget.near_limit() for _ in range(20)]  # well within one 50 ms listing window
    assert answers[0] is False
    assert answers.index(True) <= 11  # each call may have opened one descriptor


def test_a_new_descriptor_numbered_past_the_share_is_near_the_limit_without_counting() -> None:
    budget = DescriptorBudget(0.9, limit=1000)
    assert budget.near_limit(newest_fd=950)
