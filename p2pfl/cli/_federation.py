"""`p2pfl federation`: the operator's federation key and membership certificates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from p2pfl.files import atomic_write
from p2pfl.identity import IdentityError, node_id_for
from p2pfl.trust import FederationAuthority, TrustError, parse_certificate

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="P2PFL_FEDERATION_DIR",
    required=True,
    help="Directory holding the federation key (env P2PFL_FEDERATION_DIR). Keep it off the nodes.",
)


@click.group("federation")
def federation() -> None:
    """Create a federation key and admit nodes with signed membership certificates."""


@federation.command("init")
@dir_option
@click.option("--force", is_flag=True, help="Replace an existing federation key.")
def init(directory: Path, force: bool) -> None:
    """Generate the federation key and print its public key for the nodes' configuration."""
    authority = FederationAuthority.generate()
    try:
        path = authority.save(directory, force=force)
    except IdentityError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"federation_id          {authority.federation_id}")
    click.echo(f"federation_public_key  {authority.public_key.hex()}")
    click.echo(f"key written to {path} (mode 0600); configure nodes with the public key", err=True)


@federation.command("admit")
@dir_option
@click.option("--node-key", required=True, help="The node's public key, hex (`p2pfl keys show`).")
@click.option("--name", required=True, help="A name for the member (shown in peer lists).")
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True),
    default=365.0,
    show_default=True,
    help="Validity of the certificate.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the certificate (copy it to the node's state directory "
    "as federation.cert).",
)
def admit(directory: Path, node_key: str, name: str, days: float, out: Path) -> None:
    """Sign a membership certificate for a node."""
    try:
        key = bytes.fromhex(node_key)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise click.BadParameter(
            "expected 64 hex digits (from `p2pfl keys show`)", param_hint="--node-key"
        )
    try:
        authority = FederationAuthority.load(directory)
        now = time.time()
        certificate = authority.admit(key, name=name, expires_at=now + days * 86400, issued_at=now)
    except IdentityError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    atomic_write(out, certificate, mode=0o644)
    click.echo(f"admitted {node_id_for(key)} as {name!r} until {_utc(now + days * 86400)}")
    click.echo(f"certificate written to {out}", err=True)


@federation.command("show")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="P2PFL_FEDERATION_DIR",
    help="Show the federation key in this directory.",
)
@click.option(
    "--certificate",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Show the content of a certificate file instead.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(directory: Path | None, certificate: Path | None, as_json: bool) -> None:
    """Print the federation id and public key, or the fields of a certificate."""
    if certificate is not None:
        try:
            cert = parse_certificate(certificate.read_bytes())
        except TrustError as exc:
            raise click.ClickException(f"{certificate}: {exc}") from None
        info = {
            "name": cert.name,
            "node_id": cert.node_id,
            "node_public_key": cert.node_public_key.hex(),
            "federation_id": cert.federation_id,
            "issued_at": _utc(cert.issued_at),
            "expires_at": _utc(cert.expires_at),
        }
    elif directory is not None:
        try:
            authority = FederationAuthority.load(directory)
        except IdentityError as exc:
            raise click.ClickException(str(exc)) from None
        info = {
            "federation_id": authority.federation_id,
            "federation_public_key": authority.public_key.hex(),
        }
    else:
        raise click.UsageError("give --dir (the federation key) or --certificate FILE")
    if as_json:
        click.echo(json.dumps(info))
    else:
        for key, value in info.items():
            click.echo(f"{key:<22} {value}")


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
