"""Federation certificates, allowlists and open mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from p2pfl.identity import IdentityError, NodeIdentity
from p2pfl.trust import (
    MAX_REVOCATION_BYTES,
    MAX_REVOKED_KEYS,
    OPEN_MODE_WARNING,
    FederationAuthority,
    TrustError,
    TrustMode,
    TrustPolicy,
    parse_certificate,
    parse_revocations,
)

NOW = 1_800_000_000.0
DAY = 86_400.0


@pytest.fixture
def authority() -> FederationAuthority:
    return FederationAuthority.from_seed(b"F" * 32)


@pytest.fixture
def node() -> NodeIdentity:
    return NodeIdentity.from_seed(b"N" * 32)


def test_certificate_from_own_federation_is_accepted_with_name(
    authority: FederationAuthority, node: NodeIdentity
) -> None:
    cert = authority.admit(node.public_key, name="cloudlet-3", expires_at=NOW + DAY, issued_at=NOW)
    policy = TrustPolicy.federation(authority.public_key)
    assert policy.mode is TrustMode.FEDERATION
    assert policy.federation_id == authority.federation_id
    assert policy.check(node.public_key, cert, now=NOW + 10) == "cloudlet-3"
    parsed = parse_certificate(cert)
    assert (parsed.name, parsed.node_public_key) == ("cloudlet-3", node.public_key)


def test_expired_certificate_is_refused(authority: FederationAuthority, node: NodeIdentity) -> None:
    cert = authority.admit(node.public_key, name="n", expires_at=NOW + DAY, issued_at=NOW)
    with pytest.raises(TrustError) as info:
        TrustPolicy.federation(authority.public_key).check(node.public_key, cert, now=NOW + DAY)
    assert info.value.reason == "expired_certificate"


def test_certificate_of_another_federation_is_refused(node: NodeIdentity) -> None:
    ours, theirs = (
        FederationAuthority.from_seed(b"A" * 32),
        FederationAuthority.from_seed(b"B" * 32),
    )
    cert = theirs.admit(node.public_key, name="n", expires_at=NOW + DAY, issued_at=NOW)
    with pytest.raises(TrustError) as info:
        TrustPolicy.federation(ours.public_key).check(node.public_key, cert, now=NOW)
    assert info.value.reason == "foreign_certificate"


def test_forged_certificate_is_refused(authority: FederationAuthority, node: NodeIdentity) -> None:
    # An attacker copies a real certificate and edits the name and expiry: signature fails.
    cert = authority.admit(node.public_key, name="aaaa", expires_at=NOW + DAY, issued_at=NOW)
    forged = cert.replace(b"aaaa", b"root")
    assert forged != cert
    policy = TrustPolicy.federation(authority.public_key)
    with pytest.raises(TrustError) as info:
        policy.check(node.public_key, forged, now=NOW)
    assert info.value.reason == "forged_certificate"
    # ... and signing it with another key claiming to be our federation fails the same way.
    mallory = FederationAuthority.from_seed(b"M" * 32)
    fake = mallory.admit(node.public_key, name="n", expires_at=NOW + DAY, issued_at=NOW)
    fake = fake.replace(mallory.public_key, authority.public_key)
    with pytest.raises(TrustError) as info:
        policy.check(node.public_key, fake, now=NOW)
    assert info.value.reason == "forged_certificate"


def test_certificate_presented_by_another_key_is_refused(
    authority: FederationAuthority, node: NodeIdentity
) -> None:
    cert = authority.admit(node.public_key, name="n", expires_at=NOW + DAY, issued_at=NOW)
    thief = NodeIdentity.from_seed(b"T" * 32)
    with pytest.raises(TrustError) as info:
        TrustPolicy.federation(authority.public_key).check(thief.public_key, cert, now=NOW)
    assert info.value.reason == "certificate_key_mismatch"


def test_missing_or_garbage_certificate_is_refused(
    authority: FederationAuthority, node: NodeIdentity
) -> None:
    policy = TrustPolicy.federation(authority.public_key)
    with pytest.raises(TrustError) as info:
        policy.check(node.public_key, None, now=NOW)
    assert info.value.reason == "missing_certificate"
    for garbage in (b"", b"\xc1" * 100, b"\x80" + b"\xc4\x40" + bytes(64)):
        with pytest.raises(TrustError) as info:
            policy.check(node.public_key, garbage, now=NOW)
        assert info.value.reason == "malformed_certificate"


def test_federation_key_saved_private_and_reloaded(tmp_path: Path) -> None:
    authority = FederationAuthority.generate()
    path = authority.save(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert FederationAuthority.load(tmp_path).federation_id == authority.federation_id
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match=f"chmod 600 {path}"):
        FederationAuthority.load(tmp_path)


def test_allowlist_file_accepts_listed_keys_with_names(tmp_path: Path, node: NodeIdentity) -> None:
    other = NodeIdentity.from_seed(b"O" * 32)
    path = tmp_path / "allow.txt"
    path.write_text(
        f"# trusted cloudlets\n{node.public_key.hex()}  cloudlet-1\n\n{other.public_key.hex()}\n"
    )
    policy = TrustPolicy.load_allowlist(path)
    assert policy.mode is TrustMode.ALLOWLIST
    assert policy.check(node.public_key, None, now=NOW) == "cloudlet-1"
    assert policy.check(other.public_key, None, now=NOW) is None
    with pytest.raises(TrustError) as info:
        policy.check(NodeIdentity.generate().public_key, None, now=NOW)
    assert info.value.reason == "not_allowlisted"


def test_allowlist_file_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "allow.txt"
    path.write_text("# ok\nnot-a-key name\n")
    with pytest.raises(TrustError, match=f"{path}:2: expected a 64-hex-digit public key"):
        TrustPolicy.load_allowlist(path)


def test_open_mode_accepts_anyone_and_has_loud_warning() -> None:
    policy = TrustPolicy.open()
    assert policy.mode is TrustMode.OPEN
    assert policy.check(NodeIdentity.generate().public_key, None, now=NOW) is None
    assert "OPEN" in OPEN_MODE_WARNING and "experiments" in OPEN_MODE_WARNING


# --- revocation lists ---------------------------------------------------------------------------


def test_revocation_list_round_trips_and_refuses_revoked_member(
    authority: FederationAuthority, node: NodeIdentity
) -> None:
    other = NodeIdentity.from_seed(b"O" * 32)
    data = authority.revoke({node.public_key: "stolen laptop"}, serial=7, issued_at=NOW)
    parsed = parse_revocations(data, authority.public_key)
    assert (parsed.serial, parsed.issued_at, parsed.data) == (7, NOW, data)
    assert dict(parsed.revoked) == {node.public_key: "stolen laptop"}
    policy = TrustPolicy.federation(authority.public_key)
    cert = authority.admit(node.public_key, name="n", expires_at=NOW + DAY, issued_at=NOW)
    assert policy.check(node.public_key, cert, now=NOW) == "n"
    assert policy.adopt_revocations(data) == parsed
    with pytest.raises(TrustError, match="stolen laptop") as info:
        policy.check(node.public_key, cert, now=NOW)
    assert info.value.reason == "revoked"
    other_cert = authority.admit(other.public_key, name="o", expires_at=NOW + DAY, issued_at=NOW)
    assert policy.check(other.public_key, other_cert, now=NOW) == "o"


def test_revocation_list_with_bad_signature_or_foreign_key_is_refused(
    authority: FederationAuthority, node: NodeIdentity
) -> None:
    data = authority.revoke({node.public_key: "aaaa"}, serial=1, issued_at=NOW)
    policy = TrustPolicy.federation(authority.public_key)
    with pytest.raises(TrustError) as info:
        policy.adopt_revocations(data.replace(b"aaaa", b"bbbb"))
    assert info.value.reason == "forged_revocations"
    # Another federation's list, and one re-labelled as ours, are both refused.
    mallory = FederationAuthority.from_seed(b"M" * 32)
    foreign = mallory.revoke({node.public_key: None}, serial=2, issued_at=NOW)
    with pytest.raises(TrustError) as info:
        policy.adopt_revocations(foreign)
    assert info.value.reason == "foreign_revocations"
    with pytest.raises(TrustError) as info:
        policy.adopt_revocations(foreign.replace(mallory.public_key, authority.public_key))
    assert info.value.reason == "forged_revocations"
    assert policy.revocations is None
    # Signed for another purpose (a certificate's domain): refused.
    with pytest.raises(TrustError):
        parse_revocations(
            authority.admit(node.public_key, name="n", expires_at=NOW + 1, issued_at=NOW),
            authority.public_key,
        )


def test_oversized_or_malformed_revocation_list_is_refused(
    authority: FederationAuthority,
) -> None:
    policy = TrustPolicy.federation(authority.public_key)
    for garbage in (b"", b"\xc1" * 100, b"\x80" + b"\xc4\x40" + bytes(64)):
        with pytest.raises(TrustError) as info:
            policy.adopt_revocations(garbage)
        assert info.value.reason == "malformed_revocations"
    huge = b"\x80" * MAX_REVOCATION_BYTES + b"\xc4\x40" + bytes(64)
    with pytest.raises(TrustError, match="wrong size") as info:
        policy.adopt_revocations(huge)
    assert info.value.reason == "malformed_revocations"
    with pytest.raises(ValueError, match="at most"):
        authority.revoke(
            {NodeIdentity.generate().public_key: None for _ in range(MAX_REVOKED_KEYS + 1)},
            serial=1,
        )


def test_older_revocation_list_does_not_replace_a_newer_one(
    authority: FederationAuthority, node: NodeIdentity
) -> None:
    other = NodeIdentity.from_seed(b"O" * 32)
    old = authority.revoke({node.public_key: None}, serial=5, issued_at=NOW)
    new = authority.revoke({node.public_key: None, other.public_key: None}, serial=6)
    policy = TrustPolicy.federation(authority.public_key)
    assert policy.adopt_revocations(new) is not None
    assert policy.adopt_revocations(old) is None
    assert policy.adopt_revocations(new) is None  # the same list again: nothing new
    assert policy.revocations is not None and policy.revocations.serial == 6


def test_revocation_lists_need_federation_trust(
    authority: FederationAuthority, node: NodeIdentity
) -> None:
    data = authority.revoke({node.public_key: None}, serial=1)
    with pytest.raises(TrustError) as info:
        TrustPolicy.open().adopt_revocations(data)
    assert info.value.reason == "no_federation"
