"""[discovery] ice_servers, ice_credentials and ice_transport_policy: parsed, checked, applied."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.daemon.config import ConfigError, load_config, read_turn_credentials
from p2pfl.daemon.datachannel import LinkSettings, ice_configuration
from p2pfl.daemon.transport import TransportConfig

_HEAD = 'trust.mode = "open"\n[discovery]\n'


def _write(tmp_path: Path, discovery: str, credentials: str | None = None) -> Path:
    if credentials is not None:
        secret = tmp_path / "turn.toml"
        secret.write_text(credentials)
        secret.chmod(0o600)
    path = tmp_path / "p2pfl.toml"
    path.write_text(_HEAD + discovery)
    return path


def _error(tmp_path: Path, discovery: str, credentials: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, discovery, credentials))
    return info.value


_CREDENTIALS = 'username = "node-1"\ncredential = "s3cret"\n'
_TURN = 'ice_servers = ["stun:turn.lan:3478", "turn:turn.lan:3478?transport=udp"]\n'


def test_turn_credentials_come_from_their_own_file_and_reach_aiortc(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _TURN + 'ice_credentials = "turn.toml"\nice_transport_policy = "relay"\n',
        _CREDENTIALS,
    )
    config = load_config(path)
    assert config.discovery.ice_credentials == tmp_path / "turn.toml"  # relative to the file
    turn = read_turn_credentials(config)
    assert turn is not None and (turn.username, turn.credential) == ("node-1", "s3cret")
    assert "s3cret" not in repr(turn)
    settings = TransportConfig(
        ice_servers=config.discovery.ice_servers,
        turn_username=turn.username,
        turn_credential=turn.credential,
        relay_only=True,
    ).link_settings()
    assert "s3cret" not in repr(settings)
    rtc = ice_configuration(settings)
    assert rtc.iceTransportPolicy.value == "relay"
    stun, relay = rtc.iceServers or []
    assert (stun.urls, stun.username, stun.credential) == ("stun:turn.lan:3478", None, None)
    assert (relay.username, relay.credential) == ("node-1", "s3cret")


def test_default_is_no_server_and_every_candidate_type() -> None:
    rtc = ice_configuration(LinkSettings())
    assert rtc.iceServers == [] and rtc.iceTransportPolicy.value == "all"


@pytest.mark.parametrize(
    ("discovery", "line", "key", "message"),
    [
        ('ice_servers = ["stun.lan:3478"]\n', 3, "discovery.ice_servers", "not a STUN or TURN"),
        ('ice_servers = ["stuns:stun.lan"]\n', 3, "discovery.ice_servers", "stuns: is not"),
        ('ice_servers = ["turns:t.lan?transport=udp"]\n', 3, "discovery.ice_servers", "TCP"),
        ('ice_servers = ["stun:a.lan", "stun:b.lan"]\n', 3, "discovery.ice_servers", "one STUN"),
        ('ice_servers = ["turn:t.lan:99999"]\n', 3, "discovery.ice_servers", "1..65535"),
        ('ice_servers = ["turn:t.lan"]\n', 3, "discovery.ice_servers", "needs credentials"),
        (
            'ice_servers = ["stun:a.lan"]\nice_credentials = "turn.toml"\n',
            4,
            "discovery.ice_credentials",
            "only a TURN server",
        ),
        (
            'ice_servers = ["stun:a.lan"]\nice_transport_policy = "relay"\n',
            4,
            "discovery.ice_transport_policy",
            "add a turn: URL",
        ),
        ('ice_transport_policy = "tcp"\n', 3, "discovery.ice_transport_policy", '"relay"'),
    ],
)
def test_ice_mistakes_name_the_line_and_key(
    tmp_path: Path, discovery: str, line: int, key: str, message: str
) -> None:
    error = _error(tmp_path, discovery, _CREDENTIALS)
    assert (error.line, error.key) == (line, key)
    assert message in error.message
    assert str(error).startswith(f"{tmp_path / 'p2pfl.toml'}:{line}: {key}: ")


@pytest.mark.parametrize(
    ("credentials", "line", "key", "message"),
    [
        ('username = "u"\npassword = "p"\n', 2, "password", "unknown key"),
        ('username = "u"\ncredential = 7\n', 2, "credential", "non-empty string"),
        ('username = ""\ncredential = "p"\n', 1, "username", "non-empty string"),
        ('username = "u"\n', None, "credential", "missing"),
    ],
)
def test_credential_file_mistakes_name_that_file(
    tmp_path: Path, credentials: str, line: int | None, key: str, message: str
) -> None:
    error = _error(tmp_path, _TURN + 'ice_credentials = "turn.toml"\n', credentials)
    assert (error.file, error.line, error.key) == (tmp_path / "turn.toml", line, key)
    assert message in error.message


def test_a_credential_file_every_user_can_read_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, _TURN + 'ice_credentials = "turn.toml"\n', _CREDENTIALS)
    (tmp_path / "turn.toml").chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.key) == (4, "discovery.ice_credentials")
    assert "chmod o-r" in info.value.message


def test_a_missing_credential_file_is_named(tmp_path: Path) -> None:
    error = _error(tmp_path, _TURN + 'ice_credentials = "nowhere.toml"\n')
    assert (error.line, error.key) == (4, "discovery.ice_credentials")
    assert "nowhere.toml: no such file" in error.message


def test_run_check_reports_an_ice_mistake_as_one_line_and_exit_2(tmp_path: Path) -> None:
    path = _write(tmp_path, 'ice_servers = ["turn:t.lan"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "run", "--check", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(f"p2pfl: {path}:3: discovery.ice_servers: ")
    assert "ice_credentials" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_reload_says_that_changed_ice_keys_need_a_restart(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from p2pfl.daemon.node import Node, prepare

    path = _write(short_tmp, _TURN + 'ice_credentials = "turn.toml"\n', _CREDENTIALS)
    node_table = f'[node]\nstate_dir = "{short_tmp / "state"}"\nruntime_dir = "{short_tmp}"\n'
    path.write_text(path.read_text().replace("[discovery]\n", node_table + "[discovery]\n"))
    node = Node(prepare(load_config(path), check=True), config_path=path)
    path.write_text(path.read_text().replace('"turn:turn.lan:3478', '"turn:other.lan:3478'))
    with caplog.at_level(logging.WARNING):
        node.reload()
    assert "changed [discovery] keys other than static_peers need a restart" in caplog.text
    caplog.clear()
    path.write_text(path.read_text() + 'static_peers = ["192.0.2.10:7070"]\n')
    with caplog.at_level(logging.WARNING):
        node.reload()  # static peers alone apply without a restart
    assert "[discovery]" not in caplog.text
