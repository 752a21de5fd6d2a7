"""`p2pfl run --config FILE`: run the daemon in the foreground (systemd's ExecStart).

Every error a person can fix is one line on stderr and an exit status that says which kind:
2 configuration, 3 identity or trust files, 4 data; 1 is an unexpected failure (logged with its
traceback, for a bug report). systemd is told not to restart on 2, 3 and 4.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import click


@click.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="P2PFL_CONFIG",
    required=True,
    help="The daemon's TOML configuration (see daemon/p2pfl.toml; env P2PFL_CONFIG).",
)
@click.option("--check", is_flag=True, help="Check the configuration and files, then exit.")
def run(config_path: Path, check: bool) -> None:
    """Run the p2pfl daemon in the foreground until SIGTERM or Ctrl-C."""
    # Start-up allocates some 200k long-lived objects (torch's import above all) and frees almost
    # none: Python's collector went over them 3 times in full and some 440 times in part before
    # READY, finding 30-90 objects each full pass, for about 0.25 CPU-s of a start-up of 2 (see
    # benchmarks/README.md). So it is off until prepare() has built the node; _run() then freezes
    # what exists by then (kept out of every later pass, as the fork server does) and turns it on.
    gc.disable()
    from p2pfl.cli._errors import default_sigterm

    default_sigterm()  # the daemon stops on SIGTERM itself, cleanly, with status 0
    from p2pfl.daemon.config import EXIT_CONFIG, ConfigError, load_config
    from p2pfl.daemon.metrics import configure_logging

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    try:
        configure_logging(config.logging.level, config.logging.format, file=config.logging.file)
    except OSError as exc:
        _fail(
            f"{config_path}: logging.file: cannot write {config.logging.file}: {exc.strerror}; "
            "fix the path or its permissions, or leave it unset (stderr only)",
            EXIT_CONFIG,
        )
    code = _run(config, config_path, check=check)
    # Everything is checkpointed, closed and the executor's worker ended by now; interpreter
    # shutdown with torch's and aiortc's daemon threads still took seconds: exit right away.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(config: object, config_path: Path, *, check: bool) -> int:
    import trio

    from p2pfl.daemon.config import EXIT_CONFIG, Config, ConfigError
    from p2pfl.daemon.control import ControlSocketError
    from p2pfl.daemon.node import Node, StartupError, close_prepared, prepare
    from p2pfl.identity import KEY_FILE

    assert isinstance(config, Config)
    has_key = (config.state_dir / KEY_FILE).exists()
    try:
        prepared = prepare(config, check=check)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except StartupError as exc:
        _fail(str(exc), exc.exit_code)
    gc.freeze()
    gc.enable()
    if check:
        who = (
            f"node {prepared.identity.node_id}"
            if has_key
            else f"no node key in {config.state_dir} yet (the first start creates it)"
        )
        click.echo(f"configuration {config_path} is fine; {who}")
        close_prepared(prepared)
        return 0
    node = Node(prepared, config_path=config_path)
    try:
        return trio.run(node.run)
    except BaseException as exc:  # sorted below: ours become one line, the rest a traceback
        known = _first(exc, (ControlSocketError, StartupError, ConfigError))
        if known is not None:
            code = known.exit_code if isinstance(known, StartupError) else EXIT_CONFIG
            _fail(str(known), code)
        bind = _first(exc, (OSError,))
        if isinstance(bind, OSError) and bind.errno == errno.EADDRINUSE:
            _fail(f"cannot listen: {bind.strerror}; change [discovery] signaling_port", EXIT_CONFIG)
        if _first(exc, (KeyboardInterrupt,)) is not None:
            return 0
        logging.getLogger("p2pfl.daemon").critical("daemon failed", exc_info=exc)
        return 1
    finally:
        close_prepared(prepared)


def _first(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc`` or, recursively, in its exception groups."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first(inner, kinds)
            if found is not None:
                return found
    return None


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"p2pfl: {message}", err=True)
    sys.exit(code)
