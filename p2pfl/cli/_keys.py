"""`p2pfl keys`: create and show this node's identity key."""

from __future__ import annotations

import json
from pathlib import Path

import click

from p2pfl.cli._errors import EXIT_IDENTITY, fail
from p2pfl.identity import IdentityError, NodeIdentity

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="P2PFL_STATE_DIR",
    required=True,
    help="The node's state directory (env P2PFL_STATE_DIR).",
)


@click.group("keys")
def keys() -> None:
    """Create and show this node's Ed25519 identity key."""


@keys.command("init")
@state_dir_option
@click.option("--force", is_flag=True, help="Replace an existing key (the node gets a new id).")
def init(state_dir: Path, force: bool) -> None:
    """Generate the node key in STATE_DIR and print the node id."""
    identity = NodeIdentity.generate()
    try:
        path = identity.save(state_dir, force=force)
    except IdentityError as exc:
        raise fail(str(exc), EXIT_IDENTITY) from None
    click.echo(identity.node_id)
    click.echo(f"key written to {path} (mode 0600)", err=True)


@keys.command("show")
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print {node_id, public_key} as JSON.")
def show(state_dir: Path, as_json: bool) -> None:
    """Print the node id and public key (hex) of the key in STATE_DIR."""
    try:
        identity = NodeIdentity.load(state_dir)
    except IdentityError as exc:
        raise fail(str(exc), EXIT_IDENTITY) from None
    if as_json:
        click.echo(
            json.dumps({"node_id": identity.node_id, "public_key": identity.public_key.hex()})
        )
    else:
        click.echo(f"node_id     {identity.node_id}")
        click.echo(f"short_id    {identity.short_id}")
        click.echo(f"public_key  {identity.public_key.hex()}")
