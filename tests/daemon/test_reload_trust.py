"""SIGHUP and the membership certificate: a renewed one is not applied in silence."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from p2pfl.daemon.config import load_config
from p2pfl.identity import NodeIdentity
from p2pfl.trust import FederationAuthority


def test_a_reload_says_that_a_renewed_certificate_needs_a_restart(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from p2pfl.daemon.node import Node, prepare

    state = short_tmp / "state"
    state.mkdir()
    identity = NodeIdentity.generate()
    identity.save(state)
    authority = FederationAuthority.generate()
    certificate = short_tmp / "node.cert"
    now = time.time()

    def admit(days: float) -> None:
        expiry = now + days * 86400
        certificate.write_bytes(authority.admit(identity.public_key, name="n", expires_at=expiry))

    admit(30)
    path = short_tmp / "p2pfl.toml"
    path.write_text(
        f'[node]\nstate_dir = "{state}"\nruntime_dir = "{short_tmp}"\n'
        f'[trust]\nmode = "federation"\nfederation_public_key = "{authority.public_key.hex()}"\n'
        f'certificate = "{certificate}"\n'
    )
    node = Node(prepare(load_config(path), check=True), config_path=path)
    with caplog.at_level(logging.WARNING):
        node.reload()  # the same certificate: nothing to say
    assert "certificate" not in caplog.text
    admit(60)
    with caplog.at_level(logging.WARNING):
        node.reload()
    assert "a changed [trust] certificate needs a restart" in caplog.text
