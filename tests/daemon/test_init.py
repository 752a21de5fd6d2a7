"""`p2pfl init`: a node that runs, from the sample shipped inside the package."""

from __future__ import annotations

import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfl.cli import main
from p2pfl.cli._init import sample_text
from p2pfl.daemon.config import load_config
from p2pfl.identity import NodeIdentity
from p2pfl.trust import FederationAuthority, TrustPolicy

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "run", "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_sample_ships_in_the_package_and_is_what_print_sample_prints() -> None:
    code, out, _ = _cli("init", "--print-sample")
    assert code == 0
    assert out == sample_text() == (ROOT / "daemon" / "p2pfl.toml").read_text()
    assert "[discovery]" in out and "static_peers = []" in out


def test_solo_writes_key_certificate_and_a_commented_config_that_loads(tmp_path: Path) -> None:
    config, state = tmp_path / "etc" / "p2pfl.toml", tmp_path / "state"
    code, out, err = _cli(
        "init", "--solo", "--config", str(config), "--state-dir", str(state), "--name", "lab-1"
    )
    assert code == 0, err
    identity = NodeIdentity.load(state)
    assert stat.S_IMODE((state / "node.key").stat().st_mode) == 0o600
    assert identity.node_id in out and f"p2pfl run --config {config}" in out
    loaded = load_config(config)
    assert loaded.node.name == "lab-1" and loaded.state_dir == state
    assert loaded.discovery.static_peers == ()
    authority = FederationAuthority.load(config.parent / "federation")
    assert loaded.trust.federation_public_key == authority.public_key.hex()
    policy = TrustPolicy.federation(authority.public_key)
    certificate = (state / "federation.cert").read_bytes()
    assert policy.check(identity.public_key, certificate, now=time.time()) == "lab-1"
    assert config.read_text().count("\n#") > 50  # the sample's comments came along

    # Again: the configuration is not replaced without --force, and the key is never replaced.
    code, _, err = _cli("init", "--solo", "--config", str(config), "--state-dir", str(state))
    assert code == 2 and err.startswith(f"p2pfl: {config} exists; pass --force")
    code, _, err = _cli(
        "init", "--solo", "--force", "--config", str(config), "--state-dir", str(state)
    )
    assert code == 0, err
    assert NodeIdentity.load(state).node_id == identity.node_id


@pytest.mark.slow
def test_solo_node_passes_run_check_without_writing(tmp_path: Path) -> None:
    config, state = tmp_path / "p2pfl.toml", tmp_path / "state"
    code, _, err = _cli("init", "--solo", "--config", str(config), "--state-dir", str(state))
    assert code == 0, err
    before = sorted(tmp_path.rglob("*"))
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert "is fine; node " in result.stdout
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_the_printed_admit_line_run_by_the_operator_completes_the_node(tmp_path: Path) -> None:
    fed = tmp_path / "operator" / "fed"
    code, _, err = _cli("federation", "init", "--dir", str(fed))
    assert code == 0, err
    key = FederationAuthority.load(fed).public_key.hex()
    config, state = tmp_path / "node" / "p2pfl.toml", tmp_path / "node" / "state"
    code, out, err = _cli(
        "init", "--config", str(config), "--state-dir", str(state), "--name", "edge-7",
        "--federation-key", key,
    )  # fmt: skip
    assert code == 0, err
    result = _check(config)
    assert result.returncode == 3 and "p2pfl federation admit --node-key" in result.stderr
    (line,) = [s.strip() for s in out.splitlines() if s.strip().startswith("p2pfl federation")]
    argv = shlex.split(line.replace("FEDERATION_DIR", str(fed)))[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "edge-7.cert")
    code, _, err = _cli(*argv)
    assert code == 0, err
    (state / "federation.cert").write_bytes((tmp_path / "edge-7.cert").read_bytes())
    result = _check(config)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--solo", "--federation-key", "ab" * 32], "not both"),
        (["--federation-key", "xyz"], "64 hex digits"),
        (["--node-index", "3", "--nodes", "2"], "must be below --nodes"),
    ],
)
def test_init_mistakes_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = _cli("init", "--config", str(tmp_path / "c.toml"), *args)
    assert code == 2 and err.startswith("p2pfl: ") and message in err
    assert not (tmp_path / "c.toml").exists()
