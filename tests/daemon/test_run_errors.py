"""`p2pfl run`: every startup problem is one line on stderr with its own exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.identity import NodeIdentity


def _run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "run", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _config(tmp: Path, extra: str = "", trust: str = 'mode = "open"') -> Path:
    path = tmp / "node.toml"
    path.write_text(
        f'[node]\nstate_dir = "state"\nruntime_dir = "run"\n[trust]\n{trust}\n'
        f'[discovery]\nmdns = false\nlisten_host = "127.0.0.1"\n{extra}'
    )
    return path


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert lines[0].startswith("p2pfl: ")
    return lines[0]


def test_unknown_key_exits_2_naming_file_line_and_key(short_tmp: Path) -> None:
    config = _config(short_tmp, extra="mdsn = true\n")
    result = _run(config)
    assert result.returncode == 2
    assert f"{config}:9: discovery.mdsn: unknown key" in _one_line(result)


def test_missing_config_file_exits_2(short_tmp: Path) -> None:
    result = _run(short_tmp / "nope.toml")
    assert result.returncode == 2
    assert "no such file" in _one_line(result)


def test_key_file_readable_by_others_exits_3(short_tmp: Path) -> None:
    state = short_tmp / "state"
    key_path = NodeIdentity.generate().save(state)
    key_path.chmod(0o644)
    result = _run(_config(short_tmp))
    assert result.returncode == 3
    line = _one_line(result)
    assert str(key_path) in line and "can be read by group or others" in line


def test_missing_data_file_exits_4(short_tmp: Path) -> None:
    config = _config(short_tmp, extra='[task]\nname = "traffic-metr-la"\ndata = "metr-la.h5"\n')
    result = _run(config)
    assert result.returncode == 4
    line = _one_line(result)
    assert str(short_tmp / "metr-la.h5") in line and "no such file" in line


def test_federation_mode_without_certificate_exits_3_saying_how_to_get_one(
    short_tmp: Path,
) -> None:
    trust = 'mode = "federation"\nfederation_public_key = "' + "ab" * 32 + '"'
    result = _run(_config(short_tmp, trust=trust))
    assert result.returncode == 3
    line = _one_line(result)
    assert "federation.cert" in line and "p2pfl federation admit --node-key" in line


@pytest.mark.slow
def test_check_flag_validates_without_starting(short_tmp: Path) -> None:
    config = _config(short_tmp)
    before = sorted(short_tmp.rglob("*"))
    result = _run(config, "--check")
    assert result.returncode == 0, result.stderr
    assert "is fine; no node key in " in result.stdout
    assert sorted(short_tmp.rglob("*")) == before  # no state directory, key or lock made
    # With a key: its node id, and still nothing written.
    identity = NodeIdentity.generate()
    identity.save(short_tmp / "state")
    before = sorted(short_tmp.rglob("*"))
    result = _run(config, "--check")
    assert result.returncode == 0, result.stderr
    assert f"is fine; node {identity.node_id}" in result.stdout
    assert sorted(short_tmp.rglob("*")) == before


def test_check_in_federation_mode_without_a_key_says_to_create_one_and_writes_nothing(
    short_tmp: Path,
) -> None:
    trust = 'mode = "federation"\nfederation_public_key = "' + "ab" * 32 + '"'
    result = _run(_config(short_tmp, trust=trust), "--check")
    assert result.returncode == 3
    assert "p2pfl keys init --state-dir" in _one_line(result)
    assert not (short_tmp / "state").exists()


def test_live_replay_without_a_graph_tasks_cloudlets_exits_2(short_tmp: Path) -> None:
    config = _config(short_tmp, extra="[data]\nreplay_speed = 10.0\n")
    result = _run(config, "--check")
    assert result.returncode == 2
    line = _one_line(result)
    assert f"{config}:10: data.replay_speed: live replay needs a traffic task" in line


@pytest.mark.parametrize("device", ["tpu", "meta"])
def test_a_device_torch_cannot_train_on_exits_2(short_tmp: Path, device: str) -> None:
    (short_tmp / "state").mkdir()
    NodeIdentity.generate().save(short_tmp / "state")
    config = _config(short_tmp, extra=f'[executor]\ndevice = "{device}"\n')
    result = _run(config, "--check")
    assert result.returncode == 2
    line = _one_line(result)
    assert f"{config}:10: executor.device: " in line and repr(device) in line


def test_check_finds_an_interface_that_is_not_there(short_tmp: Path) -> None:
    (short_tmp / "state").mkdir()
    NodeIdentity.generate().save(short_tmp / "state")
    config = _config(short_tmp, extra='interface = "nosuchif0"\n')
    result = _run(config, "--check")
    assert result.returncode == 2
    assert "[discovery] interface 'nosuchif0': " in _one_line(result)


def test_another_cloudlets_file_exits_4(short_tmp: Path) -> None:
    from click.testing import CliRunner

    from p2pfl.cli import main as cli_main

    split = short_tmp / "split"
    done = CliRunner().invoke(cli_main, ["data", "split", "--synthetic", "2", "--out", str(split)])
    assert done.exit_code == 0, done.output
    task = (
        f'[task]\nname = "traffic-metr-la"\nn_nodes = 7\nnode_index = 1\n'
        f'data = "{split / "cloudlet-0.npz"}"\n'
    )
    result = _run(_config(short_tmp, extra=task), "--check")
    assert result.returncode == 4
    assert "sensor(s) of cloudlet 1 have no readings" in _one_line(result)
