"""Fixtures for wire tests: two deterministic identities."""

from __future__ import annotations

import pytest

from p2pfl.identity import NodeIdentity


@pytest.fixture
def alice() -> NodeIdentity:
    return NodeIdentity.from_seed(b"a" * 32)


@pytest.fixture
def bob() -> NodeIdentity:
    return NodeIdentity.from_seed(b"b" * 32)
