"""One error style and one exit status per kind of mistake, for every `p2pfl` command.

A person sees one line on stderr, ``p2pfl: <what went wrong>; <what to do>``, never a traceback
for something they can fix, and an exit status that says which kind of thing to fix:

=====  =========================================================================================
0      done
1      a failure at run time (no daemon answering, a daemon crashed, no network namespaces)
2      a mistake in the command line, a configuration or a scenario file
3      a key, certificate, allowlist or revocation list (missing, unreadable, unsafe, not ours)
4      data (a data file missing or malformed)
130    interrupted (SIGINT, Ctrl-C), after cleaning up
143    terminated (SIGTERM), after cleaning up (129: SIGHUP, its terminal closed)
=====  =========================================================================================

`p2pfl run` follows the same table (systemd does not restart it on 2, 3 and 4) and exits 0 when
SIGTERM or Ctrl-C stop it: that is how a daemon is meant to stop. The daemon's own constants
(``p2pfl.daemon.config.EXIT_CONFIG``, ``p2pfl.daemon.node.EXIT_IDENTITY`` / ``EXIT_DATA``) are
the same numbers; a test keeps them so.
"""

from __future__ import annotations

import os
import signal
import threading

import click

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_IDENTITY = 3
EXIT_DATA = 4
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM

EXIT_STATUS_HELP = """\b
Exit status (every command):
  0    done
  1    failed at run time (no daemon answering, a daemon crashed)
  2    a mistake in the command line, a configuration or scenario file
  3    a key, certificate, allowlist or revocation list problem
  4    a data problem (missing or malformed data file)
  130  interrupted (Ctrl-C), after cleaning up
  143  terminated (SIGTERM; 129: SIGHUP, the terminal closed), after cleaning up
`p2pfl run` exits 0 when SIGTERM or Ctrl-C stop it.
Errors are one line on stderr: "p2pfl: <what went wrong>; <what to do>".
"""


class CommandError(click.ClickException):
    """A failure at run time; shown as ``p2pfl: <message>``, exit status 1."""

    exit_code = EXIT_FAILURE


class UsageMistake(CommandError):
    """A mistake in the command line or a configuration or scenario file (exit status 2)."""

    exit_code = EXIT_USAGE


class IdentityProblem(CommandError):
    """A key, certificate, allowlist or revocation list problem (exit status 3)."""

    exit_code = EXIT_IDENTITY


class DataProblem(CommandError):
    """A data file missing or malformed (exit status 4)."""

    exit_code = EXIT_DATA


_BY_CODE: dict[int, type[CommandError]] = {
    error.exit_code: error for error in (CommandError, UsageMistake, IdentityProblem, DataProblem)
}


def fail(message: str, exit_code: int = EXIT_FAILURE) -> CommandError:
    """The error for ``exit_code``: ``raise fail("...; do this", EXIT_USAGE) from None``."""
    return _BY_CODE[exit_code](message)


def report(exc: click.ClickException) -> None:
    """Print ``exc`` in the one style: ``p2pfl: <message>`` (usage errors: how to get help)."""
    message = exc.format_message().rstrip(".")
    if message[:2].istitle():  # click's own messages: "No such option ..."
        message = message[0].lower() + message[1:]
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        message += " " if message.endswith("?") else "; "
        message += f"see `{exc.ctx.command_path} --help`"
    click.echo(f"p2pfl: {message}", err=True)


UNWINDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that end a command through its cleanup (with :func:`terminated`), as Ctrl-C does."""


def terminated(signum: int, _frame: object) -> None:
    """A SIGTERM/SIGHUP handler: unwind like Ctrl-C (finally blocks, cleanup), exit 128 + N.

    After SIGHUP the terminal is gone and every write to it fails (EIO), which would cut the
    cleanup short: stdout and stderr go to /dev/null from here on.
    """
    if signum == signal.SIGHUP:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
    raise SystemExit(128 + signum)


def default_sigterm() -> None:
    """Give SIGTERM and SIGHUP back their default actions (`p2pfl run` handles them itself)."""
    if threading.current_thread() is threading.main_thread():
        for sig in UNWINDING_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
