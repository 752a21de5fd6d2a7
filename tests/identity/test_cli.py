"""`p2pfl keys` and `p2pfl federation` end to end through click."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfl.cli import main
from p2pfl.identity import NodeIdentity
from p2pfl.trust import FederationAuthority, TrustPolicy


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_keys_init_prints_node_id_and_refuses_overwrite(tmp_path: Path) -> None:
    code, out = run("keys", "init", "--state-dir", str(tmp_path))
    assert code == 0
    node_id = out.splitlines()[0]
    assert node_id == NodeIdentity.load(tmp_path).node_id
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    code, out = run("keys", "init", "--state-dir", str(tmp_path))
    assert code != 0 and "--force" in out
    assert NodeIdentity.load(tmp_path).node_id == node_id
    code, out = run("keys", "init", "--state-dir", str(tmp_path), "--force")
    assert code == 0 and out.splitlines()[0] != node_id


def test_keys_show_json(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    identity.save(tmp_path)
    code, out = run("keys", "show", "--state-dir", str(tmp_path), "--json")
    assert code == 0
    assert json.loads(out) == {"node_id": identity.node_id, "public_key": identity.public_key.hex()}


def test_keys_show_refuses_readable_key_with_fix(tmp_path: Path) -> None:
    path = NodeIdentity.generate().save(tmp_path)
    os.chmod(path, 0o644)
    code, out = run("keys", "show", "--state-dir", str(tmp_path))
    assert code == 3 and f"chmod 600 {path}" in out


def test_federation_init_admit_show_produces_accepted_certificate(tmp_path: Path) -> None:
    fed_dir, state = tmp_path / "fed", tmp_path / "node"
    node = NodeIdentity.generate()
    node.save(state)
    code, out = run("federation", "init", "--dir", str(fed_dir))
    assert code == 0
    authority = FederationAuthority.load(fed_dir)
    assert authority.public_key.hex() in out
    cert_path = state / "federation.cert"
    code, out = run(
        "federation",
        "admit",
        "--dir",
        str(fed_dir),
        "--node-key",
        node.public_key.hex(),
        "--name",
        "cloudlet-1",
        "--days",
        "2",
        "--out",
        str(cert_path),
    )
    assert code == 0, out
    policy = TrustPolicy.federation(authority.public_key)
    assert policy.check(node.public_key, cert_path.read_bytes(), now=time.time()) == "cloudlet-1"
    code, out = run("federation", "show", "--certificate", str(cert_path), "--json")
    assert code == 0 and json.loads(out)["name"] == "cloudlet-1"
    code, out = run("federation", "show", "--dir", str(fed_dir), "--json")
    assert json.loads(out)["federation_id"] == authority.federation_id


def test_federation_admit_rejects_bad_node_key(tmp_path: Path) -> None:
    run("federation", "init", "--dir", str(tmp_path))
    code, out = run(
        "federation",
        "admit",
        "--dir",
        str(tmp_path),
        "--node-key",
        "abc",
        "--name",
        "n",
        "--out",
        str(tmp_path / "c"),
    )
    assert code == 2 and "64 hex digits" in out


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--days", "nan"], "invalid value for --days: must be more than 0 and at most 36500"),
        (["--days", "1e12"], "invalid value for --days: must be more than 0 and at most 36500"),
        (["--out", "nodir/c.cert"], "nodir/c.cert: No such file or directory; choose another"),
    ],
)
def test_federation_admit_mistakes_are_one_line(
    tmp_path: Path, extra: list[str], says: str
) -> None:
    run("federation", "init", "--dir", str(tmp_path))
    key = NodeIdentity.generate().public_key.hex()
    args = ["--node-key", key, "--name", "n", "--out", str(tmp_path / "c.cert")]
    if extra[0] == "--out":
        args[-1] = str(tmp_path / extra[1])
    else:
        args += extra
    code, out = run("federation", "admit", "--dir", str(tmp_path), *args)
    assert code == 2 and says in out and "Traceback" not in out, out


def test_a_members_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    run("federation", "init", "--dir", str(tmp_path))
    (tmp_path / "members.txt").write_bytes(b"\xff\xfe n\n")
    code, out = run("federation", "revoke", "--dir", str(tmp_path), "--name", "n")
    assert code == 3 and "cannot look up member 'n'" in out and "not a members file" in out


def test_federation_revoke_extends_the_list_that_show_displays(tmp_path: Path) -> None:
    fed_dir = tmp_path / "fed"
    run("federation", "init", "--dir", str(fed_dir))
    authority = FederationAuthority.load(fed_dir)
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    bob_cert = tmp_path / "bob.cert"
    for identity, name, out_path in ((alice, "alice", tmp_path / "a"), (bob, "bob", bob_cert)):
        code, out = run(
            "federation", "admit", "--dir", str(fed_dir), "--node-key",
            identity.public_key.hex(), "--name", name, "--out", str(out_path),
        )  # fmt: skip
        assert code == 0, out
    out_file = tmp_path / "revocations.list"
    code, out = run(
        "federation", "revoke", "--dir", str(fed_dir), "--name", "alice",
        "--reason", "stolen", "--out", str(out_file),
    )  # fmt: skip
    assert code == 0, out
    assert alice.node_id in out
    first = TrustPolicy.federation(authority.public_key)
    listed = first.adopt_revocations(out_file.read_bytes())
    assert listed is not None and dict(listed.revoked) == {alice.public_key: "stolen"}
    # A second revocation keeps the first and replaces the list (larger serial).
    code, out = run("federation", "revoke", "--dir", str(fed_dir), "--certificate", str(bob_cert))
    assert code == 0, out
    newer = first.adopt_revocations((fed_dir / "revocations.list").read_bytes())
    assert newer is not None and newer.serial > listed.serial
    assert set(newer.revoked) == {alice.public_key, bob.public_key}
    code, out = run(
        "federation", "show", "--dir", str(fed_dir), "--revocations",
        str(fed_dir / "revocations.list"), "--json",
    )  # fmt: skip
    assert code == 0, out
    shown = json.loads(out)
    assert shown["serial"] == newer.serial
    assert {e["node_id"]: e["reason"] for e in shown["revoked"]} == {
        alice.node_id: "stolen",
        bob.node_id: None,
    }
    code, out = run("federation", "show", "--revocations", str(out_file))
    assert code == 0 and alice.node_id in out and "stolen" in out


def test_federation_revoke_needs_exactly_one_member(tmp_path: Path) -> None:
    run("federation", "init", "--dir", str(tmp_path))
    code, out = run("federation", "revoke", "--dir", str(tmp_path))
    assert code == 2 and "exactly one" in out
    code, out = run("federation", "revoke", "--dir", str(tmp_path), "--name", "nobody")
    assert code != 0 and "nobody" in out


def test_corrupt_key_names_the_command_that_replaces_it(tmp_path: Path) -> None:
    path = NodeIdentity.generate().save(tmp_path)
    path.write_text("not a key")
    code, out = run("keys", "show", "--state-dir", str(tmp_path))
    assert code == 3
    assert f"`p2pfl keys init --state-dir {tmp_path} --force`" in out


def test_missing_federation_key_names_federation_init(tmp_path: Path) -> None:
    code, out = run("federation", "show", "--dir", str(tmp_path))
    assert code == 3
    assert out.startswith("p2pfl: ") and f"`p2pfl federation init --dir {tmp_path}`" in out


def test_federation_show_takes_a_certificate_list_or_directory_as_argument(tmp_path: Path) -> None:
    fed_dir = tmp_path / "fed"
    run("federation", "init", "--dir", str(fed_dir))
    node = NodeIdentity.generate()
    cert = tmp_path / "node.cert"
    code, out = run(
        "federation", "admit", "--dir", str(fed_dir), "--node-key", node.public_key.hex(),
        "--name", "cloudlet-1", "--out", str(cert),
    )  # fmt: skip
    assert code == 0, out
    code, out = run("federation", "show", str(cert), "--json")
    assert code == 0, out
    assert json.loads(out)["node_id"] == node.node_id
    code, out = run("federation", "show", str(fed_dir), "--json")
    assert code == 0 and "federation_public_key" in json.loads(out)
    revocations = tmp_path / "revocations.list"
    code, out = run(
        "federation", "revoke", "--dir", str(fed_dir), "--name", "cloudlet-1",
        "--out", str(revocations),
    )  # fmt: skip
    assert code == 0, out
    code, out = run("federation", "show", str(revocations), "--json")
    assert code == 0, out
    assert [e["node_id"] for e in json.loads(out)["revoked"]] == [node.node_id]
    # Anything else is one line saying what it is not.
    code, out = run("federation", "show", str(fed_dir / "members.txt"))
    assert code == 3
    assert out.startswith("p2pfl: ") and "neither a certificate nor a revocation list" in out
