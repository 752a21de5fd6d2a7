"""`p2pfl init`: set up a node that runs: key, commented configuration, admission.

The configuration is the shipped sample (``p2pfl/daemon/p2pfl.toml``, every key with a comment)
with this node's values put in. Then either ``--solo``, a federation of one made on the spot
(key, certificate) so `p2pfl run` works at once, or the exact `p2pfl federation admit` line to
send to the federation's operator, whose certificate completes the node.

An existing node key is kept (a new key is a new node); an existing configuration is replaced
only with ``--force``.
"""

from __future__ import annotations

import os
import re
import socket
import time
from importlib import resources
from pathlib import Path

import click

from p2pfl.cli._errors import EXIT_IDENTITY, EXIT_USAGE, fail

SAMPLE = "p2pfl.toml"


def sample_text() -> str:
    """The sample configuration shipped inside the package."""
    return resources.files("p2pfl.daemon").joinpath(SAMPLE).read_text(encoding="utf-8")


def set_key(text: str, table: str, key: str, value: str) -> str:
    """``text`` with ``key = value`` in ``[table]``, replacing the key's line (set or commented).

    ``value`` is TOML already. The sample has every key on its own line, so a line scan is
    exact; a key the sample lacks is a bug here, not the user's mistake.
    """
    lines = text.splitlines(keepends=True)
    current = ""
    pattern = re.compile(rf"^(#\s*)?{re.escape(key)}\s*=")
    for i, line in enumerate(lines):
        header = re.match(r"^\[([^\]]+)\]", line)
        if header:
            current = header.group(1).strip()
        elif current == table and pattern.match(line):
            lines[i] = f"{key} = {value}\n"
            return "".join(lines)
    raise KeyError(f"the sample configuration has no {table}.{key}")


def _toml_string(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _default_config_path() -> Path:
    if os.geteuid() == 0:
        return Path("/etc/p2pfl/p2pfl.toml")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "p2pfl" / "p2pfl.toml"


def _print_sample(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(sample_text(), nl=False)
        ctx.exit(0)


@click.command("init")
@click.option(
    "--print-sample",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_sample,
    help="Print the sample configuration (every key, commented) and exit.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the configuration [root: /etc/p2pfl/p2pfl.toml, "
    "else ~/.config/p2pfl/p2pfl.toml].",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The node's state directory (key, certificate, checkpoints) "
    "[root: /var/lib/p2pfl, else ~/.local/state/p2pfl].",
)
@click.option("--name", default=None, help="The node's name, shown to peers [the host name].")
@click.option(
    "--solo",
    is_flag=True,
    help="Make a federation of one here and admit this node: for trying p2pfl alone.",
)
@click.option(
    "--federation-key",
    default=None,
    help="The federation's public key (64 hex digits, from its operator).",
)
@click.option(
    "--federation-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="--solo: where the federation key goes [federation/ next to the configuration]; "
    "an existing one is used.",
)
@click.option("--node-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="This node's data partition ([task] node_index).")  # fmt: skip
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many partitions the data is split into ([task] n_nodes).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing configuration file.")
def init(
    config_path: Path | None,
    state_dir: Path | None,
    name: str | None,
    solo: bool,
    federation_key: str | None,
    federation_dir: Path | None,
    node_index: int,
    nodes: int,
    force: bool,
) -> None:
    """Set up this node: key, configuration (with comments) and its admission."""
    from p2pfl.daemon.config import ConfigError, default_runtime_dir, default_state_dir
    from p2pfl.daemon.config import parse_config as check_config
    from p2pfl.identity import KEY_FILE, IdentityError, NodeIdentity

    if solo and federation_key is not None:
        raise click.UsageError("give --solo or --federation-key, not both")
    if federation_key is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", federation_key):
        raise click.BadParameter("expected 64 hex digits", param_hint="--federation-key")
    if node_index >= nodes:
        raise click.BadParameter(f"must be below --nodes ({nodes})", param_hint="--node-index")
    config_path = (config_path or _default_config_path()).absolute()
    state_dir = (state_dir or default_state_dir()).absolute()
    name = name or socket.gethostname()
    if config_path.exists() and not force:
        raise fail(
            f"{config_path} exists; pass --force to replace it (the node key is kept), or "
            "choose another --config",
            EXIT_USAGE,
        )

    try:
        if (state_dir / KEY_FILE).exists():
            identity, made_key = NodeIdentity.load(state_dir), False
        else:
            identity, made_key = NodeIdentity.generate(), True
            identity.save(state_dir)
    except IdentityError as exc:
        raise fail(str(exc), EXIT_IDENTITY) from None

    if solo:
        federation_dir = (federation_dir or config_path.parent / "federation").absolute()
        federation_key = _admit_solo(federation_dir, identity, name, state_dir)

    text = sample_text()
    values = {
        ("node", "name"): _toml_string(name),
        ("node", "state_dir"): _toml_string(state_dir),
        ("node", "runtime_dir"): _toml_string(default_runtime_dir()),
        ("trust", "federation_public_key"): _toml_string(federation_key or ""),
        ("task", "node_index"): str(node_index),
        ("task", "n_nodes"): str(nodes),
    }
    for (table, key), value in values.items():
        text = set_key(text, table, key, value)
    if federation_key is None:
        text = text.replace(
            'federation_public_key = ""\n',
            'federation_public_key = ""  # TO DO: the key your federation operator gives you\n',
        )
    else:
        try:  # what we write must load; a failure here is a bug in this command
            check_config(text, config_path)
        except ConfigError as exc:
            raise fail(f"the configuration written would not load: {exc}") from None
    try:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        from p2pfl.files import atomic_write

        atomic_write(config_path, text.encode(), mode=0o640)
    except OSError as exc:
        raise fail(f"cannot write {config_path}: {exc.strerror}; choose another --config") from None

    key_note = "created" if made_key else "kept the existing one"
    click.echo(f"configuration  {config_path}")
    click.echo(f"node key       {state_dir / KEY_FILE} ({key_note}; node id {identity.node_id})")
    run = f"p2pfl run --config {config_path}"
    if solo:
        click.echo(f"federation     {federation_dir} (a federation of one; keep its key private)")
        click.echo(f"certificate    {state_dir / 'federation.cert'}")
        click.echo("\nnext:")
        click.echo(f"  {run} --check && {run}")
        click.echo(f"  p2pfl status --config {config_path}")
        click.echo("admit another node of this federation (on its machine: `p2pfl init`):")
        click.echo(
            f"  p2pfl federation admit --dir {federation_dir} --node-key HEX --name NAME "
            "--out NAME.cert"
        )
        return
    click.echo("\nsend this line to the federation operator, who runs it and sends back the file:")
    click.echo(
        f"  p2pfl federation admit --dir FEDERATION_DIR --node-key {identity.public_key.hex()} "
        f"--name {name} --out {name}.cert"
    )
    click.echo("then:")
    click.echo(f"  install -m 0600 {name}.cert {state_dir / 'federation.cert'}")
    if federation_key is None:
        click.echo(
            f"  set [trust] federation_public_key in {config_path} "
            "(the operator's `p2pfl federation show --dir FEDERATION_DIR`)"
        )
    click.echo(f"  {run} --check && {run}")


def _admit_solo(directory: Path, identity: object, name: str, state_dir: Path) -> str:
    """Make (or reuse) the federation key in ``directory``, admit the node; the key's hex."""
    from p2pfl.cli._federation import MEMBERS_FILE
    from p2pfl.files import atomic_write
    from p2pfl.identity import IdentityError, NodeIdentity
    from p2pfl.trust import CERTIFICATE_FILE, FEDERATION_KEY_FILE, FederationAuthority

    assert isinstance(identity, NodeIdentity)
    try:
        if (directory / FEDERATION_KEY_FILE).exists():
            authority = FederationAuthority.load(directory)
        else:
            authority = FederationAuthority.generate()
            authority.save(directory)
        now = time.time()
        certificate = authority.admit(
            identity.public_key, name=name, expires_at=now + 365 * 86400, issued_at=now
        )
        atomic_write(state_dir / CERTIFICATE_FILE, certificate, mode=0o600)
    except IdentityError as exc:
        raise fail(str(exc), EXIT_IDENTITY) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    with (directory / MEMBERS_FILE).open("a", encoding="utf-8") as members:
        members.write(f"{identity.public_key.hex()} {name}\n")
    return authority.public_key.hex()
