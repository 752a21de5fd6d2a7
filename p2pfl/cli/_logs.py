"""`p2pfl logs [-f]`: the daemon's log, from wherever it goes.

Where the log is comes from the running daemon itself (the ``status`` reply names its systemd
unit and its ``[logging] file``), else, with the daemon stopped, from ``--config``, else from
systemd's unit ``p2pfl``:

- a daemon under systemd logs to stderr, which journald keeps: ``journalctl -u <unit>``;
- a daemon with ``[logging] file`` set: that file (followed across logrotate with ``-f``);
- a daemon run by hand with neither logs only to the terminal that started it; nothing here can
  show that, and the command says so (exit status 1).

The first line, on stderr, says which of these is shown, so stdout holds only log lines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import click

from p2pfl.cli._errors import EXIT_FAILURE, EXIT_USAGE, fail
from p2pfl.cli._status import find_socket, socket_options
from p2pfl.daemon.control import ControlError, request

DEFAULT_UNIT = "p2pfl.service"


@click.command("logs")
@socket_options
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option(
    "-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True,
    help="How many of the last lines to show first.",
)  # fmt: skip
def logs(socket_path: Path | None, config_path: Path | None, follow: bool, lines: int) -> None:
    """Show the daemon's log: journald under systemd, else its [logging] file."""
    source = _where(socket_path, config_path)
    if isinstance(source, Path):
        click.echo(f"p2pfl: showing {source} (the daemon's [logging] file)", err=True)
        _tail(source, lines, follow)
        return
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        raise fail(f"the daemon runs as {source} but journalctl is not installed", EXIT_FAILURE)
    argv = [journalctl, "--unit", source, "--lines", str(lines), "--no-pager"]
    if follow:
        argv.append("--follow")
    click.echo(f"p2pfl: showing journald's log of {source} ({' '.join(argv[1:])})", err=True)
    code = subprocess.call(argv)
    if code:
        raise SystemExit(code)


def _where(socket_path: Path | None, config_path: Path | None) -> Path | str:
    """The log file (a Path) or the systemd unit (a str) to show; a clear error if neither."""
    path = find_socket(socket_path, config_path)
    try:
        node = request(path, "status", timeout=2.0)
    except ControlError:
        node = None
    if isinstance(node, dict) and "log_file" in node:  # an older daemon does not say
        if node["log_file"]:
            return Path(node["log_file"])
        if node.get("systemd_unit"):
            return str(node["systemd_unit"])
        raise fail(
            f"the daemon (pid {node.get('pid')}) logs only to the terminal that started it (not "
            "under systemd, no [logging] file); set [logging] file in its configuration "
            "and restart it to keep a log `p2pfl logs` can show",
            EXIT_FAILURE,
        )
    if config_path is not None:
        from p2pfl.daemon.config import ConfigError, load_config

        try:
            file = load_config(config_path).logging.file
        except ConfigError as exc:
            raise fail(str(exc), EXIT_USAGE) from None
        if file is not None:
            return file
    if _unit_installed(DEFAULT_UNIT):
        return DEFAULT_UNIT
    raise fail(
        f"no daemon answers on {path} and there is no log to show: no systemd unit "
        f"{DEFAULT_UNIT} and no [logging] file (give --config FILE to name one)",
        EXIT_FAILURE,
    )


def _unit_installed(unit: str) -> bool:
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        return False  # not booted with systemd
    result = subprocess.run(
        [systemctl, "show", "--property=LoadState", "--value", unit],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "loaded"


def _tail(path: Path, lines: int, follow: bool) -> None:
    """Print the last ``lines`` lines of ``path``; with ``follow``, then every new one, reopening
    the file when logrotate moves it away or cuts it short."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise fail(f"cannot read the log file {path}: {exc.strerror}", EXIT_FAILURE) from None
    out = sys.stdout.buffer
    try:
        last: deque[bytes] = deque(handle, maxlen=lines)
        out.writelines(last if lines else [])
        out.flush()
        while follow:
            chunk = handle.read()
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            time.sleep(0.2)
            try:
                info = os.stat(path)
            except FileNotFoundError:
                continue  # rotated away: the new file comes
            if info.st_ino != os.fstat(handle.fileno()).st_ino or info.st_size < handle.tell():
                handle.close()
                handle = path.open("rb")
    finally:
        handle.close()
