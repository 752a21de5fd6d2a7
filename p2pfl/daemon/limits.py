"""Descriptor budget: the daemon raises its own limit at start and sheds work before it runs out.

Every socket a stranger can make the daemon open (a signaling connection, a WebRTC link with its
UDP sockets, an outgoing dial) costs a file descriptor. When they run out, ``accept`` fails with
EMFILE and so does everything else that opens a file (a checkpoint, the metrics endpoint), so the
daemon refuses new remote work at ``shed_fraction`` of ``RLIMIT_NOFILE`` instead.

Counting open descriptors means listing ``/proc/self/fd``; that is done only when it can matter:
descriptors are numbered lowest-free first, so a freshly opened one numbered below half the limit
proves there is room without looking.
"""

from __future__ import annotations

import logging
import os
import resource
import time

__all__ = ["DescriptorBudget", "raise_nofile_limit"]

log = logging.getLogger(__name__)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit", extra={"error": str(exc)})
    return soft, hard


def _open_descriptors() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc, or no descriptor left to list it with
        return None


class DescriptorBudget:
    """``near_limit()`` is True when new remote work should be refused to keep descriptors free.

    The limit is read again with every call (``prlimit`` can change it from outside), unless a
    fixed ``limit`` is given.
    """

    def __init__(self, shed_fraction: float = 0.9, *, limit: int | None = None) -> None:
        self.shed_fraction = shed_fraction
        self._fixed = limit
        self.limit = limit if limit is not None else _soft_limit()
        self._checked_at = -1.0
        self._listed: int | None = 0  # descriptors counted at the last listing
        self._since = 0  # calls since then: each may have opened one more (never fewer)

    def near_limit(self, newest_fd: int | None = None) -> bool:
        if self._fixed is None:
            self.limit = _soft_limit()  # one cheap system call
        shed_at = int(self.limit * self.shed_fraction)
        if newest_fd is not None and newest_fd >= 0:
            if newest_fd < self.limit // 2:
                return False  # every lower number could be open: still at most half used
            if newest_fd >= shed_at:
                return True  # lowest-free numbering: at least newest_fd + 1 are open
        now = time.monotonic()
        if now - self._checked_at >= 0.05:  # at most 20 listings a second
            self._listed, self._since = _open_descriptors(), 0
            self._checked_at = now
        else:
            self._since += 1  # between listings, assume each call opened one (a burst of
            # accepts within 50 ms must not overshoot the limit)
        return self._listed is None or self._listed + self._since >= shed_at


def _soft_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
