"""The `p2pfl` command.

Subcommands live in their own modules and are imported only when used, so `p2pfl --help` and
`p2pfl status` start fast without importing torch or aiortc. To add a subcommand, add one line to
``_COMMANDS``: its name, then ``module:attribute`` of the click command.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import click

from p2pfl import __version__
from p2pfl.cli._errors import (
    EXIT_INTERRUPTED,
    EXIT_STATUS_HELP,
    UNWINDING_SIGNALS,
    report,
    terminated,
)

_COMMANDS: dict[str, tuple[str, str]] = {
    # name: (import path, one-line help shown by `p2pfl --help`)
    "data": ("p2pfl.cli._data:data", "Prepare data for a deployment (one file per cloudlet)."),
    "federation": (
        "p2pfl.cli._federation:federation",
        "Federation key and membership certificates.",
    ),
    "forecast": ("p2pfl.cli._forecast:forecast", "Show the daemon's live traffic forecast."),
    "init": ("p2pfl.cli._init:init", "Set up this node: key, configuration, admission."),
    "keys": ("p2pfl.cli._keys:keys", "Create and show this node's identity key."),
    "logs": ("p2pfl.cli._logs:logs", "Show the daemon's log (journald or its log file)."),
    "peers": ("p2pfl.cli._status:peers", "List the running daemon's peers."),
    "run": ("p2pfl.cli._run:run", "Run the daemon in the foreground (systemd: ExecStart)."),
    "status": ("p2pfl.cli._status:status", "Show what the running daemon is doing."),
    "stop": ("p2pfl.cli._stop:stop", "Stop the running daemon (final checkpoint, exit 0)."),
    "simulate": ("p2pfl.cli._simulate:simulate", "Run a simulation scenario (TOML) and plot it."),
    "train": ("p2pfl.cli._train:train", "Train one model on all data of a task (the baseline)."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = _COMMANDS[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{_COMMANDS[cmd_name][0]} is not a click command")
        return command

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Click's main, with our error style and exit statuses (see ``p2pfl.cli._errors``)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        # SIGTERM and SIGHUP (the terminal closed) unwind like Ctrl-C, so every command cleans
        # up; `run` gives them back to the daemon.
        installed = []
        if threading.current_thread() is threading.main_thread():
            for sig in UNWINDING_SIGNALS:
                if signal.getsignal(sig) is signal.SIG_DFL:
                    signal.signal(sig, terminated)
                    installed.append(sig)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except (click.Abort, KeyboardInterrupt):
            sys.stderr.flush()
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as exc:
            report(exc)
            sys.exit(exc.exit_code)
        finally:
            for sig in installed:
                signal.signal(sig, signal.SIG_DFL)
        # Without standalone mode click returns the command's value, or the code of an Exit.
        sys.exit(result if isinstance(result, int) else 0)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from the table, so listing commands imports nothing heavy.
        rows = [(name, short_help) for name, (_, short_help) in _COMMANDS.items()]
        rows += [(name, command.get_short_help_str()) for name, command in self.commands.items()]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_STATUS_HELP,
)
@click.version_option(__version__, prog_name="p2pfl")
def main() -> None:
    """p2pfl: peer-to-peer decentralized learning for edge nodes.

    Daemons find each other with mDNS, talk over WebRTC data channels and train one model
    together (gossip learning or server-free federated learning), every message signed.
    """
