"""The control socket and `p2pfl status` / `p2pfl peers` against a live server and a stopped one."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pfl.daemon.control import (
    CheckpointStatus,
    ControlError,
    ControlServer,
    ControlSocketError,
    NodeStatus,
    PeerStatus,
    fetch_status,
    request,
)

NOW = time.time()


def _status(trust_mode: str = "federation") -> NodeStatus:
    return NodeStatus(
        node_id="a3f9c2e1" + "0" * 44,
        short_id="a3f9c2e1",
        name="cloudlet-1",
        version="0.1.0",
        pid=4242,
        started_at=NOW - 3725,
        now=NOW,
        federation_id="fed-77",
        trust_mode=trust_mode,
        protocol="gossip",
        task="digits",
        round=42,
        model_updated_at=NOW - 3,
        last_loss=0.2311,
        metric_name="accuracy",
        metric_value=0.9123,
        training_state="training",
        bytes_in=3 << 20,
        bytes_out=5 << 20,
        rejected={"bad_signature": 2},
        drops_by_stage={"envelope": 2, "signaling": 3, "link": 1},
        drops={
            "envelope/bad_signature": 2,
            "link/incomplete_timeout": 1,
            "signaling/bad_signature": 3,
        },
        checkpoint=CheckpointStatus(seq=12, digest="9f" * 32, created=NOW - 125),
        revocation_serial=1_800_000_000_000,
        revoked=2,
        peers=(
            PeerStatus(
                "b7" * 26,
                "cloudlet-2",
                "connected",
                0.8,
                1 << 20,
                2 << 20,
                NOW - 1,
                0,
                address="203.0.113.7:50412",
                ice_path="server reflexive",
            ),
            PeerStatus("c1" * 26, "", "down", None, 0, 0, None, 2, {"envelope": 2, "link": 1}),
        ),
    )


async def _serve(
    nursery: trio.Nursery, path: Path, node: NodeStatus | None = None
) -> ControlServer:
    node = node or _status()
    server = ControlServer(
        path, {"status": lambda _: node.to_json(), "peers": lambda _: node.to_json()["peers"]}
    )
    await nursery.start(server.serve)
    return server


async def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "p2pfl", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_socket_is_owner_only_in_an_owner_only_directory(short_tmp: Path) -> None:
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o755)
    runtime.chmod(0o755)
    async with trio.open_nursery() as nursery:
        await _serve(nursery, runtime / "control.sock")
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
        info = (runtime / "control.sock").stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        nursery.cancel_scope.cancel()
    assert not (runtime / "control.sock").exists()  # removed on the way out


async def test_status_json_against_a_live_server_is_the_whole_status(short_tmp: Path) -> None:
    path = short_tmp / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        result = await _cli("status", "--socket", str(path), "--json")
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["node_id"].startswith("a3f9c2e1") and data["round"] == 42
    assert data["metric_name"] == "accuracy" and data["metric_value"] == pytest.approx(0.9123)
    assert [p["name"] for p in data["peers"]] == ["cloudlet-2", ""]
    assert data["rejected"] == {"bad_signature": 2} and data["warnings"] == []
    assert data["drops_by_stage"] == {"envelope": 2, "signaling": 3, "link": 1}
    assert data["drops"]["link/incomplete_timeout"] == 1
    assert [p["drops"] for p in data["peers"]] == [{}, {"envelope": 2, "link": 1}]


async def test_status_table_shows_node_model_and_peers(short_tmp: Path) -> None:
    path = short_tmp / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        result = await _cli("status", "--socket", str(path))
        peers = await _cli("peers", "--socket", str(path))
        nursery.cancel_scope.cancel()
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    for expected in (
        "a3f9c2e1  cloudlet-1",
        "up 1h02m",
        "trust: federation   revoked: 2 (list 1800000000000)",
        "round 42, updated 3s ago; loss 0.2311, accuracy 0.9123",
        "training    training",
        "dropped     6 (signaling 3, link 1, envelope 2)",
        "checkpoint  #12, 2m05s ago, sha256 9f9f9f9f9f9f",
        "PEER",
        "cloudlet-2",
        "0.8 ms",
        "2.0 MiB",
        "never",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert "WARNING" not in out
    assert "DROPPED" in out and "link 1, envelope 2" in out  # the peer that is down
    assert peers.returncode == 0 and "cloudlet-2" in peers.stdout.decode()
    assert "round 42" not in peers.stdout.decode()
    # `peers` also says where each peer is and how the link travels; `status` stays compact.
    peer_lines = peers.stdout.decode().splitlines()
    assert "ADDRESS" in peer_lines[0] and "PATH" in peer_lines[0]
    assert "203.0.113.7:50412  server reflexive" in peer_lines[1]
    assert "ADDRESS" not in out


async def test_open_trust_mode_is_warned_loudly(short_tmp: Path) -> None:
    path = short_tmp / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path, _status(trust_mode="open"))
        table = await _cli("status", "--socket", str(path))
        as_json = await _cli("status", "--socket", str(path), "--json")
        nursery.cancel_scope.cancel()
    first_line = table.stdout.decode().splitlines()[0]
    assert first_line.startswith("WARNING: trust mode is OPEN")
    assert '[trust] mode = "federation"' in table.stdout.decode()  # markup did not eat it
    assert "OPEN" in json.loads(as_json.stdout)["warnings"][0]


@pytest.mark.parametrize("command", ["status", "peers"])
async def test_stopped_daemon_is_one_line_and_exit_status_1(short_tmp: Path, command: str) -> None:
    result = await _cli(command, "--socket", str(short_tmp / "control.sock"))
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "p2pfl daemon is not running" in lines[0]
    assert str(short_tmp / "control.sock") in lines[0]


async def test_stale_socket_of_a_dead_daemon_counts_as_stopped_and_is_replaced(
    short_tmp: Path,
) -> None:
    path = short_tmp / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what SIGKILL leaves behind
    result = await _cli("status", "--socket", str(path))
    assert result.returncode == 1 and "not running" in result.stderr.decode()
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        status = await trio.to_thread.run_sync(fetch_status, path)
        nursery.cancel_scope.cancel()
    assert status.round == 42 and status.peers[0].rtt_ms == 0.8


async def test_second_server_on_a_live_socket_is_refused(short_tmp: Path) -> None:
    path = short_tmp / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        with pytest.raises(ControlSocketError, match="already listening"):
            await ControlServer(path, {}).serve()
        nursery.cancel_scope.cancel()


async def test_runtime_dir_of_another_user_is_refused(short_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by someone else")
    other = short_tmp / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(ControlSocketError, match="belongs to uid 65534"):
        await ControlServer(other / "control.sock", {}).serve()


async def test_bad_requests_get_error_replies_not_a_crash(short_tmp: Path) -> None:
    path = short_tmp / "control.sock"

    def boom(_: Any) -> Any:
        raise RuntimeError("bug")

    server = ControlServer(path, {"status": lambda _: {"round": 1}, "boom": boom})

    def exchange(lines: list[bytes]) -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b"".join(lines))
            reader = sock.makefile("rb")
            return [json.loads(reader.readline()) for _ in lines]

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        replies = await trio.to_thread.run_sync(
            exchange,
            [
                b"not json\n",
                b'{"nocmd": 1}\n',
                b'{"cmd": "nope"}\n',
                b'{"cmd": "boom"}\n',
                b'{"cmd": "status"}\n',
            ],
        )
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            await trio.to_thread.run_sync(lambda: request(path, "nope"))
        nursery.cancel_scope.cancel()
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert replies[2]["error"] == "unknown command 'nope'; known: boom, status"
    assert replies[3]["error"] == "internal error; see the daemon's log"
    assert replies[4]["result"] == {"round": 1}


async def test_status_finds_the_socket_from_the_configuration_file(short_tmp: Path) -> None:
    config = short_tmp / "p2pfl.toml"
    config.write_text('[node]\nruntime_dir = "run"\n[trust]\nmode = "open"\n')
    async with trio.open_nursery() as nursery:
        await _serve(nursery, short_tmp / "run" / "control.sock")
        result = await _cli("status", "--config", str(config), "--json")
        peers = await _cli("peers", "--config", str(config), "--json")
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["round"] == 42
    assert peers.returncode == 0 and len(json.loads(peers.stdout)) == 2


async def test_status_with_a_broken_configuration_is_a_usage_mistake(short_tmp: Path) -> None:
    config = short_tmp / "p2pfl.toml"
    config.write_text("[node]\nrun_dir = 1\n")
    result = await _cli("status", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"p2pfl: {config}:2: node.run_dir: unknown key; keys of [node]: name, position, "
        "runtime_dir, state_dir"
    ]


@pytest.mark.parametrize(
    ("mdns", "static", "expected"),
    [
        (True, 2, "no peers yet (trying mDNS and 2 static peers)"),
        (True, 0, "no peers yet (trying mDNS)"),
        (False, 1, "no peers yet (trying 1 static peer)"),
        (False, 0, "mDNS is off and there are no static peers"),
    ],
)
async def test_no_peers_says_what_is_tried_and_only_that(
    short_tmp: Path, mdns: bool, static: int, expected: str
) -> None:
    path = short_tmp / "control.sock"
    node = dataclasses.replace(_status(), peers=(), mdns=mdns, static_peers=static)
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path, node)
        result = await _cli("status", "--socket", str(path))
        nursery.cancel_scope.cancel()
    out = " ".join(result.stdout.decode().split())  # rich may wrap the line
    assert result.returncode == 0, result.stderr
    assert expected in out
    if not mdns and not static:
        assert "[discovery] mdns = true" in out and "being tried" not in out


async def test_status_watch_refreshes_until_ctrl_c_then_exits_130_quietly(
    short_tmp: Path,
) -> None:
    path = short_tmp / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        process = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, "-m", "p2pfl", "status", "--socket", str(path), "--watch",
                 "--interval", "0.2"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )  # fmt: skip
        out = b""
        with trio.fail_after(30):
            while out.count(b"round 42") < 3:
                out += await process.stdout.receive_some(65536)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await process.wait()
        err = await process.stderr.receive_some(65536)
        nursery.cancel_scope.cancel()
    assert process.returncode == 130
    assert err.strip() == b""  # no traceback, no "Aborted!" (click ends the ^C line)
    assert b"Ctrl-C to stop" in out and b"cloudlet-2" in out


async def test_stop_asks_the_daemon_over_the_socket_and_waits_until_it_is_gone(
    short_tmp: Path,
) -> None:
    path = short_tmp / "control.sock"
    asked = trio.Event()

    def stop(_: Any) -> Any:
        asked.set()
        return {"stopping": True, "pid": 4242}

    server = ControlServer(path, {"status": lambda _: _status().to_json(), "stop": stop})
    async with trio.open_nursery() as nursery:
        scope = await nursery.start(_serve_until_cancelled, server)
        cli = await nursery.start(_run_cli, ["stop", "--socket", str(path)])
        await asked.wait()
        await trio.sleep(0.5)  # the CLI waits while the daemon still answers
        assert cli.returncode is None
        scope.cancel()  # the daemon exits: its socket goes away
        with trio.fail_after(10):
            await cli.wait()
    assert cli.returncode == 0
    assert (await cli.stdout.receive_some(4096)).decode() == ("the daemon (pid 4242) has stopped\n")


async def test_stop_of_a_daemon_that_is_not_running_is_one_line_and_status_1(
    short_tmp: Path,
) -> None:
    result = await _cli("stop", "--socket", str(short_tmp / "control.sock"))
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode().startswith("p2pfl: p2pfl daemon is not running")


async def _serve_until_cancelled(
    server: ControlServer, *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """Serve until the scope it hands back is cancelled: a daemon that exits."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            task_status.started(scope)


async def _run_cli(args: list[str], *, task_status: trio.TaskStatus[trio.Process]) -> None:
    await trio.run_process(
        [sys.executable, "-m", "p2pfl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
        task_status=task_status,
    )


async def test_status_shows_the_active_and_passive_views_under_max_peers(short_tmp: Path) -> None:
    path = short_tmp / "control.sock"
    passive = {"b7" * 16: 0, "c1" * 16: 3}
    sampling = {
        "max_peers": 4,
        "active": ["a0" * 16, "d2" * 16],
        "reserved": ["e3" * 16],
        "passive": passive,
        "shuffles": 17,
    }
    node = dataclasses.replace(_status(), sampling=sampling)
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path, node)
        result = await _cli("status", "--socket", str(path))
        as_json = await _cli("status", "--socket", str(path), "--json")
        nursery.cancel_scope.cancel()
    out = result.stdout.decode()
    assert "active      2 of max_peers 4, 1 opening: a0a0a0a0, d2d2d2d2" in out
    assert "passive     2: b7b7b7b7 (age 0), c1c1c1c1 (age 3); 17 shuffles" in out
    assert json.loads(as_json.stdout)["sampling"]["passive"] == passive
    # Without a bound there is no view line.
    assert "max_peers" not in (await _cli_status_text(short_tmp / "plain.sock"))


async def _cli_status_text(path: Path) -> str:
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        result = await _cli("status", "--socket", str(path))
        nursery.cancel_scope.cancel()
    return result.stdout.decode()


@pytest.mark.parametrize(
    "reply",
    [b'{"ok": true}\n', b'{"ok": true, "result": [1]}\n', b'{"ok": true, "result": {"x": 1}}\n'],
)
def test_a_reply_without_a_status_is_one_line_not_a_crash(short_tmp: Path, reply: bytes) -> None:
    """Something else on the socket (or a broken daemon) answers ok without a status."""
    import threading

    path = short_tmp / "control.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(4096)
            connection.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(ControlError, match=f"the daemon on {path} sent "):
            fetch_status(path)
    finally:
        thread.join(5)
        server.close()
