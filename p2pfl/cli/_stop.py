"""`p2pfl stop`: ask the running daemon to stop, as `systemctl stop` (SIGTERM) would.

The daemon stops taking work, writes a final checkpoint, closes its connections and exits 0. The
request goes over the control socket, which is 0600 in a 0700 directory: only the daemon's user
(and root) can stop it. By default the command waits until the daemon is gone.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from p2pfl.cli._errors import EXIT_FAILURE, fail
from p2pfl.cli._status import find_socket, socket_options
from p2pfl.daemon.control import ControlError, DaemonNotRunning, request


@click.command("stop")
@socket_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the daemon to exit (0: ask and return at once).",
)
def stop(socket_path: Path | None, config_path: Path | None, timeout: float) -> None:
    """Stop the running daemon: final checkpoint, then exit 0 (like SIGTERM)."""
    path = find_socket(socket_path, config_path)
    try:
        reply = request(path, "stop")
    except ControlError as exc:
        raise fail(str(exc), EXIT_FAILURE) from None
    pid = reply.get("pid") if isinstance(reply, dict) else None
    who = f"daemon (pid {pid})" if pid else "daemon"
    if timeout == 0:
        click.echo(f"asked the {who} to stop; it checkpoints and exits")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request(path, "status", timeout=2.0)
        except DaemonNotRunning:
            # Its socket goes last, after the final checkpoint (or stop_timeout_s).
            click.echo(f"the {who} has stopped")
            return
        except ControlError:
            pass  # closing down: asked between its last reply and its exit
        time.sleep(0.2)
    raise fail(
        f"the {who} was asked to stop but still answers on {path} after {timeout:g} s; "
        "see `p2pfl logs` for what it is doing",
        EXIT_FAILURE,
    )
