"""`p2pfl federation`: the operator's federation key, membership certificates, revocations.

The federation directory holds ``federation.key`` (secret), ``members.txt`` (one line per
admitted node: public key hex and name, for ``revoke --name``) and ``revocations.list`` (the
newest revocation list, which ``revoke`` extends).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from p2pfl.cli._errors import EXIT_IDENTITY, EXIT_USAGE, fail
from p2pfl.files import atomic_write
from p2pfl.identity import IdentityError, node_id_for
from p2pfl.trust import (
    REVOCATIONS_FILE,
    FederationAuthority,
    RevocationList,
    TrustError,
    parse_certificate,
    parse_revocations,
)

MEMBERS_FILE = "members.txt"

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
        raise fail(str(exc), EXIT_IDENTITY) from None
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
    if not 0 < days <= MAX_DAYS:  # also nan
        raise click.BadParameter(f"must be more than 0 and at most {MAX_DAYS}", param_hint="--days")
    key = _parse_node_key(node_key)
    try:
        authority = FederationAuthority.load(directory)
        now = time.time()
        certificate = authority.admit(key, name=name, expires_at=now + days * 86400, issued_at=now)
    except IdentityError as exc:
        raise fail(str(exc), EXIT_IDENTITY) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    _write(out, certificate)
    with (directory / MEMBERS_FILE).open("a", encoding="utf-8") as members:
        members.write(f"{key.hex()} {name}\n")
    click.echo(f"admitted {node_id_for(key)} as {name!r} until {_utc(now + days * 86400)}")
    click.echo(f"certificate written to {out}", err=True)


MAX_DAYS = 36500
"""The longest validity ``admit`` signs: 100 years (a certificate stores milliseconds)."""


def _write(out: Path, data: bytes) -> None:
    """Write ``--out``; a path that cannot be written is one usage line, nothing half-written."""
    try:
        atomic_write(out, data, mode=0o644)
    except OSError as exc:
        raise fail(f"--out {out}: {exc.strerror}; choose another path", EXIT_USAGE) from None


def _parse_node_key(node_key: str) -> bytes:
    try:
        key = bytes.fromhex(node_key)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise click.BadParameter(
            "expected 64 hex digits (from `p2pfl keys show`)", param_hint="--node-key"
        )
    return key


def _member_keys(directory: Path, name: str) -> list[bytes]:
    path = directory / MEMBERS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        keys = [
            bytes.fromhex(k) for k, _, n in (line.partition(" ") for line in lines) if n == name
        ]
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, or a line without a hex key
        reason = exc.strerror if isinstance(exc, OSError) else f"not a members file ({exc})"
        raise fail(
            f"cannot look up member {name!r}: {path}: {reason}; revoke with --node-key",
            EXIT_IDENTITY,
        ) from None
    if not keys:
        raise click.BadParameter(f"no member named {name!r} in {path}", param_hint="--name")
    return keys


@federation.command("revoke")
@dir_option
@click.option("--node-key", help="The member's public key, hex (`p2pfl keys show`).")
@click.option("--name", help="The member's name, as admitted (looked up in members.txt).")
@click.option(
    "--certificate",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The member's certificate file.",
)
@click.option("--reason", default=None, help="Why (shown to operators; at most 64 characters).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the list here (give it to the nodes as [trust] revocations).",
)
def revoke(
    directory: Path,
    node_key: str | None,
    name: str | None,
    certificate: Path | None,
    reason: str | None,
    out: Path | None,
) -> None:
    """Withdraw a member: sign a new revocation list that also lists it.

    The list (in the federation directory, revocations.list) keeps every earlier revocation and
    gets a larger serial, so nodes replace their older list with it. Give it to any node (its
    [trust] revocations file, then SIGHUP): nodes pass the newest list on to each other.
    """
    if sum(x is not None for x in (node_key, name, certificate)) != 1:
        raise click.UsageError("give exactly one of --node-key, --name or --certificate")
    if node_key is not None:
        keys = [_parse_node_key(node_key)]
    elif certificate is not None:
        try:
            keys = [parse_certificate(certificate.read_bytes()).node_public_key]
        except TrustError as exc:
            raise fail(f"{certificate}: {exc}", EXIT_IDENTITY) from None
    else:
        assert name is not None
        keys = _member_keys(directory, name)
    try:
        authority = FederationAuthority.load(directory)
    except IdentityError as exc:
        raise fail(str(exc), EXIT_IDENTITY) from None
    master = directory / REVOCATIONS_FILE
    revoked: dict[bytes, str | None] = {}
    serial = 0
    if master.exists():
        try:
            current = parse_revocations(master.read_bytes(), authority.public_key)
        except TrustError as exc:
            raise fail(f"{master}: {exc}; move it away to start anew", EXIT_IDENTITY) from None
        revoked, serial = dict(current.revoked), current.serial
    for key in keys:
        revoked[key] = reason
    now = time.time()
    # Above the last serial, and above every serial issued before now (should the directory
    # have lost its list, a new one still replaces what the nodes hold).
    serial = max(serial + 1, round(now * 1000))
    try:
        data = authority.revoke(revoked, serial=serial, issued_at=now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reason") from None
    atomic_write(master, data, mode=0o644)
    if out is not None:
        _write(out, data)
    for key in keys:
        click.echo(f"revoked {node_id_for(key)}" + (f" ({reason})" if reason else ""))
    click.echo(
        f"revocation list serial {serial}, {len(revoked)} revoked, written to "
        f"{out or master}; give it to a node ([trust] revocations, then SIGHUP)",
        err=True,
    )


def _revocations_info(revocations: RevocationList) -> dict[str, object]:
    return {
        "federation_id": revocations.federation_id,
        "serial": revocations.serial,
        "issued_at": _utc(revocations.issued_at),
        "revoked": [
            {"node_id": node_id_for(key), "node_public_key": key.hex(), "reason": reason}
            for key, reason in revocations.revoked.items()
        ],
    }


@federation.command("show")
@click.argument(
    "path", required=False, type=click.Path(exists=True, path_type=Path), metavar="[FILE|DIR]"
)
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
@click.option(
    "--revocations",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Show a revocation list (checked against --dir's key when given).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(
    path: Path | None,
    directory: Path | None,
    certificate: Path | None,
    revocations: Path | None,
    as_json: bool,
) -> None:
    """Print the federation id and public key, the fields of a certificate, or a revocation list.

    FILE is a certificate or a revocation list (told apart by their content), DIR a federation
    directory; or name what to show with the options.
    """
    info: dict[str, object]
    if path is not None:
        if certificate is not None or revocations is not None:
            raise click.UsageError("give FILE or --certificate/--revocations, not both")
        if path.is_dir():
            directory = path
        elif _is_certificate(path):
            certificate = path
        else:
            revocations = path
    if revocations is not None:
        try:
            expected = None if directory is None else FederationAuthority.load(directory).public_key
            listed = parse_revocations(revocations.read_bytes(), expected)
        except (TrustError, IdentityError) as exc:
            guessed = "neither a certificate nor a revocation list: " if path is not None else ""
            raise fail(f"{revocations}: {guessed}{exc}", EXIT_IDENTITY) from None
        info = _revocations_info(listed)
        if not as_json:
            for field in ("federation_id", "serial", "issued_at"):
                click.echo(f"{field:<22} {info[field]}")
            for entry in listed.revoked.items():
                click.echo(f"revoked                {node_id_for(entry[0])}  {entry[1] or ''}")
            return
    elif certificate is not None:
        try:
            cert = parse_certificate(certificate.read_bytes())
        except TrustError as exc:
            raise fail(f"{certificate}: {exc}", EXIT_IDENTITY) from None
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
            raise fail(str(exc), EXIT_IDENTITY) from None
        info = {
            "federation_id": authority.federation_id,
            "federation_public_key": authority.public_key.hex(),
        }
    else:
        raise click.UsageError(
            "give --dir (the federation key), --certificate FILE or --revocations FILE"
        )
    if as_json:
        click.echo(json.dumps(info))
    else:
        for key, value in info.items():
            click.echo(f"{key:<22} {value}")


def _is_certificate(path: Path) -> bool:
    try:
        parse_certificate(path.read_bytes())
    except (OSError, TrustError):
        return False
    return True


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
