"""Fixtures for the networking tests: private namespaces and real node processes.

Every test here runs inside a network namespace the test creates (``p2pfl.sim.netns``): in-process
tests enter a ``SharedNetwork`` with the calling thread before trio starts their nodes (so the
nodes' asyncio threads and sockets live inside); multi-process tests start
``python -m p2pfl.sim.testnode`` with ``ip netns exec``. Needs root (CI) or, as an ordinary user,
``python -m p2pfl.sim.netns -- pytest tests/net``; otherwise the tests skip saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from p2pfl.sim.netns import BridgedNetwork, SharedNetwork, can_create_namespaces

_NETNS_OK: bool | None = None


@pytest.fixture(autouse=True)
def _skip_without_namespaces(request: pytest.FixtureRequest) -> None:
    """Tests marked ``netns`` skip (saying how to run them) where namespaces can't be created."""
    global _NETNS_OK
    if request.node.get_closest_marker("netns") is None:
        return
    if _NETNS_OK is None:
        _NETNS_OK = can_create_namespaces()
    if not _NETNS_OK:
        pytest.skip(
            "needs network namespaces: run as root, or as a user with "
            "`python -m p2pfl.sim.netns -- pytest tests/net`"
        )


@pytest.fixture
def shared_net() -> Iterator[Callable[[int], SharedNetwork]]:
    """Factory: ``shared_net(n)`` creates and enters a SharedNetwork; deleted after the test."""
    created: list[Any] = []

    def make(n_nodes: int) -> SharedNetwork:
        net = SharedNetwork(n_nodes)
        created.append(net)
        entered = net.enter()
        entered.__enter__()
        created.append(entered)
        return net

    try:
        yield make
    finally:
        for item in reversed(created):
            if isinstance(item, SharedNetwork):
                item.close()
            else:
                item.__exit__(None, None, None)


@pytest.fixture
def bridged_net() -> Iterator[Callable[[int], BridgedNetwork]]:
    created: list[BridgedNetwork] = []

    def make(n_nodes: int) -> BridgedNetwork:
        net = BridgedNetwork(n_nodes)
        created.append(net)
        return net

    try:
        yield make
    finally:
        for net in created:
            net.close()
