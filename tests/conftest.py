"""Fixtures for every test.

No asyncio task may be orphaned: a task whose exception nobody retrieved, or one destroyed while
still pending, is logged by asyncio on the ``asyncio`` logger (when the task is collected) and
nowhere else, so it would otherwise pass unseen. After each test the garbage is collected, and
the test fails if asyncio logged either message during it.

A full collection costs 0.1-0.2 s with torch loaded, four times the run time of the protocol and
wire tests, so it runs only while asyncio task objects are still alive (asyncio tracks every task
weakly; one freed by reference counting has already been reported, one in a reference cycle
still counts as alive until the collection).
"""

from __future__ import annotations

import asyncio.tasks
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

_ORPHANS = (
    "Task exception was never retrieved",
    "Future exception was never retrieved",
    "Task was destroyed but it is pending",
)


def _asyncio_tasks_alive() -> bool:
    tracked = getattr(asyncio.tasks, "_all_tasks", None)  # Python 3.11; 3.12: _scheduled_tasks
    if tracked is None:
        tracked = getattr(asyncio.tasks, "_scheduled_tasks", None)
    return tracked is None or len(tracked) > 0


class _OrphanRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if any(marker in record.getMessage() for marker in _ORPHANS):
            self.lines.append(self.format(record))


@pytest.fixture(autouse=True)
def _no_orphaned_asyncio_tasks() -> Iterator[None]:
    recorder = _OrphanRecorder()
    logger = logging.getLogger("asyncio")
    logger.addHandler(recorder)
    try:
        yield
        if _asyncio_tasks_alive():
            gc.collect()
    finally:
        logger.removeHandler(recorder)
    if recorder.lines:
        pytest.fail(
            "asyncio tasks were orphaned (an exception nobody retrieved, or destroyed while "
            "pending):\n\n" + "\n\n".join(recorder.lines),
            pytrace=False,
        )


@pytest.fixture
def node_status() -> Callable[..., Any]:
    """Factory: a daemon's ``NodeStatus`` as `p2pfl status` receives it, fields overridable."""
    import time

    from p2pfl.daemon.control import NodeStatus

    def make(**fields: Any) -> Any:
        now = time.time()
        values: dict[str, Any] = {
            "node_id": "a3f9c2e1" + "0" * 44,
            "short_id": "a3f9c2e1",
            "name": "cloudlet-1",
            "version": "0.1.0",
            "pid": 4242,
            "started_at": now - 60,
            "now": now,
            "federation_id": "fed-77",
            "trust_mode": "federation",
            "protocol": "gossip",
            "task": "digits",
            "round": 42,
            "model_updated_at": None,
            "last_loss": None,
            "metric_name": "accuracy",
            "metric_value": None,
            "training_state": "training",
        }
        values.update(fields)
        return NodeStatus(**values)

    return make
