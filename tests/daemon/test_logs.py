"""`p2pfl logs`: journald under systemd, else the daemon's [logging] file, else a clear line."""

from __future__ import annotations

import functools
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from p2pfl.daemon.control import ControlServer, NodeStatus
from p2pfl.daemon.metrics import configure_logging
from p2pfl.daemon.notify import systemd_unit


async def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "p2pfl", *args], capture_stdout=True, capture_stderr=True,
        check=False,
    )  # fmt: skip


async def _serve(nursery: trio.Nursery, path: Path, node: NodeStatus) -> None:
    server = ControlServer(path, {"status": lambda _: node.to_json()})
    await nursery.start(server.serve)


async def test_logs_shows_the_end_of_the_daemons_log_file_and_says_so(
    short_tmp: Path, node_status: Callable[..., NodeStatus]
) -> None:
    log = short_tmp / "p2pfl.log"
    log.write_text("".join(f"line {i}\n" for i in range(60)))
    sock = short_tmp / "control.sock"
    node = node_status(log_file=str(log))
    async with trio.open_nursery() as nursery:
        await _serve(nursery, sock, node)
        result = await _cli("logs", "--socket", str(sock), "-n", "3")
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"line 57\nline 58\nline 59\n"
    assert result.stderr.decode() == f"p2pfl: showing {log} (the daemon's [logging] file)\n"


async def test_logs_follow_prints_new_lines_across_a_rotation_until_ctrl_c(
    short_tmp: Path, node_status: Callable[..., NodeStatus]
) -> None:
    log = short_tmp / "p2pfl.log"
    log.write_text("old\n")
    sock = short_tmp / "control.sock"
    node = node_status(log_file=str(log))
    async with trio.open_nursery() as nursery:
        await _serve(nursery, sock, node)
        process = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, "-m", "p2pfl", "logs", "--socket", str(sock), "-f"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )

        async def read_until(text: bytes, seen: bytes) -> bytes:
            with trio.fail_after(20):
                while text not in seen:
                    seen += await process.stdout.receive_some(4096)
            return seen

        seen = await read_until(b"old\n", b"")
        with log.open("a") as f:
            f.write("new\n")
        seen = await read_until(b"new\n", seen)
        log.rename(short_tmp / "p2pfl.log.1")  # logrotate, and the daemon reopens
        log.write_text("after rotation\n")
        seen = await read_until(b"after rotation\n", seen)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await process.wait()
        nursery.cancel_scope.cancel()
    assert seen == b"old\nnew\nafter rotation\n"
    assert process.returncode == 130


async def test_logs_of_a_daemon_under_systemd_asks_journald_for_its_unit(
    short_tmp: Path, node_status: Callable[..., NodeStatus]
) -> None:
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "journalctl"
    fake.write_text('#!/bin/sh\necho "journalctl $*"\n')
    fake.chmod(0o755)
    sock = short_tmp / "control.sock"
    node = node_status(systemd_unit="p2pfl.service")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    async with trio.open_nursery() as nursery:
        await _serve(nursery, sock, node)
        result = await trio.run_process(
            [sys.executable, "-m", "p2pfl", "logs", "--socket", str(sock), "-f"],
            capture_stdout=True, capture_stderr=True, check=False, env=env,
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"journalctl --unit p2pfl.service --lines 50 --no-pager --follow\n"
    assert "showing journald's log of p2pfl.service" in result.stderr.decode()


async def test_logs_of_a_daemon_with_no_log_to_show_says_where_its_log_went(
    short_tmp: Path, node_status: Callable[..., NodeStatus]
) -> None:
    sock = short_tmp / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, sock, node_status())  # by hand, no [logging] file
        result = await _cli("logs", "--socket", str(sock))
        nursery.cancel_scope.cancel()
    assert result.returncode == 1 and result.stdout == b""
    (line,) = result.stderr.decode().splitlines()
    assert "logs only to the terminal that started it" in line
    assert "set [logging] file" in line


async def test_logs_with_the_daemon_stopped_reads_the_file_its_configuration_names(
    short_tmp: Path,
) -> None:
    config = short_tmp / "p2pfl.toml"
    config.write_text(
        '[node]\nruntime_dir = "run"\n[trust]\nmode = "open"\n[logging]\nfile = "log/p2pfl.log"\n'
    )
    (short_tmp / "log").mkdir()
    (short_tmp / "log" / "p2pfl.log").write_text("stopped cleanly\n")
    result = await _cli("logs", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"stopped cleanly\n"


def test_systemd_unit_is_read_from_the_cgroup_only_under_systemd() -> None:
    cgroup = "0::/system.slice/p2pfl.service\n"
    assert systemd_unit({}, cgroup) is None  # no $INVOCATION_ID: not started by systemd
    assert systemd_unit({"INVOCATION_ID": "ab12"}, cgroup) == "p2pfl.service"
    assert systemd_unit({"INVOCATION_ID": "ab12"}, "0::/user.slice/session-2.scope\n") == (
        "session-2.scope"
    )


def test_log_file_gets_timestamped_lines_and_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "p2pfl.log"
    sink = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    try:
        configure_logging("info", "logfmt", sink, file=path)
        logging.getLogger("p2pfl.test").info("hello", extra={"round": 3})
    finally:
        configure_logging("info", "logfmt")  # back to stderr only; closes the file
        sink.close()
    line = path.read_text()
    assert line.startswith("ts=") and "msg=hello round=3" in line
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
