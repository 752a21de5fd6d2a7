"""sd_notify over real unix datagram sockets: path and abstract addresses, watchdog timing."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pfl.daemon.notify import SystemdNotifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def _drain(sock: socket.socket) -> list[str]:
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(2)


def test_ready_status_and_stopping_arrive_as_sd_notify_lines(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("listening on 7070")
    assert notifier.status("round 3, 2 peers")
    assert notifier.stopping()
    assert notifier.reloading()
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 7070"
    assert sock.recv(4096) == b"STATUS=round 3, 2 peers"
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    reloading = sock.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    notifier.close()


def test_abstract_socket_address_is_used_with_a_leading_nul() -> None:
    name = f"p2pfl-test-notify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        with SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_systemd_every_call_is_a_quiet_no_op() -> None:
    notifier = SystemdNotifier.from_environment({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False


def test_a_vanished_notify_socket_does_not_raise(tmp_path: Path) -> None:
    with SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as notifier:
        assert notifier.ready() is False


async def test_watchdog_pings_at_half_the_watchdog_period(
    receiver: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    with SystemdNotifier.from_environment(env) as notifier:
        assert notifier.watchdog_usec == 2_000_000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.run_watchdog)
            await trio.sleep(2.5)
            nursery.cancel_scope.cancel()
    assert _drain(sock) == ["WATCHDOG=1"] * 3  # at t = 0, 1.0 and 2.0


def test_watchdog_for_another_pid_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    with SystemdNotifier.from_environment(env) as notifier:
        assert notifier.watchdog_usec is None
