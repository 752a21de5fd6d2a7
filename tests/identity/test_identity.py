"""Node keys: ids derived from keys, 0600 key files, refusal of readable keys, signatures."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from p2pfl.identity import (
    KEY_FILE,
    IdentityError,
    NodeIdentity,
    node_id_for,
    verify_signature,
)


def test_node_id_is_stable_lowercase_and_fixed_length() -> None:
    identity = NodeIdentity.from_seed(bytes(range(32)))
    assert identity.node_id == node_id_for(identity.public_key)
    assert re.fullmatch(r"[a-z2-7]{32}", identity.node_id)
    assert identity.short_id == identity.node_id[:8]
    assert NodeIdentity.from_seed(bytes(range(32))).node_id == identity.node_id
    assert NodeIdentity.from_seed(bytes(32)).node_id != identity.node_id


def test_signature_verifies_only_for_same_key_and_data() -> None:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    signature = a.sign(b"hello")
    assert verify_signature(a.public_key, signature, b"hello")
    assert not verify_signature(a.public_key, signature, b"hellO")
    assert not verify_signature(b.public_key, signature, b"hello")
    assert not verify_signature(a.public_key[:31], signature, b"hello")
    assert not verify_signature(a.public_key, signature[:63], b"hello")


def test_save_writes_0600_key_and_load_returns_same_identity(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    path = identity.save(tmp_path / "state")
    assert path == tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert NodeIdentity.load(tmp_path / "state").public_key == identity.public_key


def test_save_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = NodeIdentity.generate()
    first.save(tmp_path)
    with pytest.raises(IdentityError, match="--force"):
        NodeIdentity.generate().save(tmp_path)
    assert NodeIdentity.load(tmp_path).node_id == first.node_id
    second = NodeIdentity.generate()
    second.save(tmp_path, force=True)
    assert NodeIdentity.load(tmp_path).node_id == second.node_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_loading_group_or_other_readable_key_is_refused_with_chmod_hint(
    tmp_path: Path, mode: int
) -> None:
    path = NodeIdentity.generate().save(tmp_path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError) as info:
        NodeIdentity.load(tmp_path)
    assert f"chmod 600 {path}" in str(info.value)


def test_missing_key_error_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="p2pfl keys init --state-dir"):
        NodeIdentity.load(tmp_path)


def test_corrupt_key_file_is_an_identity_error(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=str(path)):
        NodeIdentity.load(tmp_path)


def test_a_directory_where_the_key_should_be_is_an_identity_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).mkdir()
    with pytest.raises(IdentityError, match="is not a regular file; point to the key file"):
        NodeIdentity.load(tmp_path)


def test_load_or_create_creates_once_then_loads(tmp_path: Path) -> None:
    created = NodeIdentity.load_or_create(tmp_path / "s")
    assert NodeIdentity.load_or_create(tmp_path / "s").node_id == created.node_id
