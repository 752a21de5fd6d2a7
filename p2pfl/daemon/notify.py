"""sd_notify: tell systemd we are ready, what we are doing, that we are alive, that we stop.

Speaks the datagram protocol of sd_notify(3) directly over ``$NOTIFY_SOCKET`` (a path, or an
abstract socket written ``@name``), so there is no dependency on libsystemd. Without systemd the
variable is unset and every call is a no-op, so the daemon runs unchanged from a shell.

The watchdog pings at half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled(3) advises), only when
``$WATCHDOG_PID`` is unset or names this process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import trio


class SystemdNotifier:
    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        self.watchdog_usec = watchdog_usec
        if address:
            # "@name" is the abstract namespace: a leading NUL byte on the wire.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        watchdog: int | None = None
        pid = env.get("WATCHDOG_PID")
        usec = env.get("WATCHDOG_USEC", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``ready=1`` -> ``READY=1``); False if not sent.

        Never raises: systemd being busy or gone must not take the daemon down.
        """
        if self._socket is None or self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            lines.append(f"{key.upper()}={text}")
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(ready=1, status=status) if status else self.notify(ready=1)

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(stopping=1, status=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd pair this with the reload request (systemd.service(5)).
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(reloading=1, monotonic_usec=now_usec)

    async def run_watchdog(self) -> None:
        """Ping WATCHDOG=1 every half period until cancelled; returns at once without a watchdog."""
        if self.watchdog_usec is None or self._socket is None:
            return
        interval = self.watchdog_usec / 2 / 1_000_000
        while True:
            self.notify(watchdog=1)
            await trio.sleep(interval)

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def systemd_unit(environ: Mapping[str, str] | None = None, cgroup: str | None = None) -> str | None:
    """The systemd unit this process runs as (``p2pfl.service``), or None when not under systemd.

    systemd sets ``$INVOCATION_ID`` for every unit it starts; the unit's name is the last part
    of the process's cgroup path (``0::/system.slice/p2pfl.service``). `p2pfl logs` uses it to
    ask journald for the right unit.
    """
    environ = os.environ if environ is None else environ
    if not environ.get("INVOCATION_ID"):
        return None
    if cgroup is None:
        try:
            cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    for line in cgroup.splitlines():
        for part in reversed(line.rpartition(":")[2].split("/")):
            if part.endswith((".service", ".scope")):
                return part
    return None
