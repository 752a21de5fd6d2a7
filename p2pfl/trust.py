"""Who may join: federation certificates, an allowlist of keys, or (for experiments) anyone.

- ``federation``: an operator holds a federation key (`FederationAuthority`) and admits a node by
  signing a membership certificate for the node's public key: a name and an expiry. Peers accept
  a node only with an unexpired certificate signed by the federation key they were configured
  with (`TrustPolicy.federation`).
- ``allowlist``: a file of trusted public keys (`TrustPolicy.load_allowlist`, format below).
- ``open``: anyone on the network is accepted. Only for local experiments; whoever runs it must
  show `OPEN_MODE_WARNING` in logs and status.

A certificate is a frame of two msgpack values, like an envelope: a map
``{"v": 1, "federation": key, "node": key, "name": str, "issued_ms": int, "expires_ms": int}``
followed by the 64-byte Ed25519 signature (bin 8) over
``signing_input(Domain.CERTIFICATE, map bytes)``.

A revocation list withdraws members before their certificates expire. It is signed by the
federation key like a certificate: a map ``{"v": 1, "federation": key, "serial": int,
"issued_ms": int, "revoked": [[node key, reason or nil], ...]}`` followed by the signature over
``signing_input(Domain.REVOCATION, map bytes)``. Of two valid lists the one with the larger
serial is newer (`RevocationList.newer_than`); `TrustPolicy.revocations` is the newest one a
node knows, and `TrustPolicy.check` refuses every key it lists (reason ``revoked``).

Allowlist file: UTF-8 text, one trusted node per line: the 64-hex-digit public key (as printed by
`p2pfl keys show`), optionally followed by whitespace and a name; ``#`` starts a comment.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfl.identity import (
    NodeIdentity,
    load_private_key,
    node_id_for,
    save_private_key,
    verify_signature,
)
from p2pfl.wire import DecodeLimits, Domain, WireError, signing_input, unpack

FEDERATION_KEY_FILE = "federation.key"
CERTIFICATE_FILE = "federation.cert"
CERTIFICATE_VERSION = 1
MAX_NAME_CHARS = 64
MAX_CERTIFICATE_BYTES = 1024
# Certificates issued slightly in the future (clock differences) are still accepted.
ISSUE_SKEW_S = 300.0

OPEN_MODE_WARNING = (
    "TRUST MODE IS OPEN: any device that can reach this node may join, send models and receive "
    "them. Use open mode only for local experiments; set trust mode to 'federation' or "
    "'allowlist' for anything else."
)

_CERT_LIMITS = DecodeLimits(
    max_frame_bytes=MAX_CERTIFICATE_BYTES, max_str_bytes=256, max_bin_bytes=64, max_depth=1
)
_CERT_FIELDS = ("v", "federation", "node", "name", "issued_ms", "expires_ms")

REVOCATIONS_FILE = "revocations.list"
REVOCATION_VERSION = 1
MAX_REVOKED_KEYS = 4096
MAX_REASON_CHARS = 64
MAX_REVOCATION_BYTES = 256 * 1024
_REVOCATION_LIMITS = DecodeLimits(
    max_frame_bytes=MAX_REVOCATION_BYTES,
    max_str_bytes=4 * MAX_REASON_CHARS,
    max_bin_bytes=32,
    max_array_len=MAX_REVOKED_KEYS,
    max_map_len=8,
    max_depth=3,
    max_values=3 * MAX_REVOKED_KEYS + 16,
)
_REVOCATION_FIELDS = ("v", "federation", "serial", "issued_ms", "revoked")


class TrustMode(enum.StrEnum):
    FEDERATION = "federation"
    ALLOWLIST = "allowlist"
    OPEN = "open"


class TrustError(Exception):
    """A peer or a trust file was refused; ``reason`` is a short slug for counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Certificate:
    """The content of a membership certificate (see `parse_certificate`; not yet verified)."""

    federation_public_key: bytes
    node_public_key: bytes
    name: str
    issued_at: float  # seconds since the epoch
    expires_at: float
    signed_bytes: bytes
    signature: bytes

    @property
    def federation_id(self) -> str:
        return node_id_for(self.federation_public_key)

    @property
    def node_id(self) -> str:
        return node_id_for(self.node_public_key)


def parse_certificate(data: bytes) -> Certificate:
    """Decode certificate bytes without checking the signature; raises `TrustError`."""
    trailer = 2 + 64
    if not MAX_CERTIFICATE_BYTES >= len(data) > trailer or data[-trailer:-64] != b"\xc4\x40":
        raise TrustError("malformed_certificate", "certificate has the wrong size or layout")
    signed = data[:-trailer]
    try:
        fields = unpack(signed, _CERT_LIMITS)
    except WireError as exc:
        raise TrustError(
            "malformed_certificate", f"certificate is not valid msgpack: {exc}"
        ) from None
    if not isinstance(fields, dict) or sorted(fields) != sorted(_CERT_FIELDS):
        raise TrustError("malformed_certificate", f"certificate fields must be {_CERT_FIELDS}")
    if fields["v"] != CERTIFICATE_VERSION:
        raise TrustError("malformed_certificate", f"certificate version {fields['v']!r} unknown")
    keys_ok = all(
        isinstance(fields[k], bytes) and len(fields[k]) == 32 for k in ("federation", "node")
    )
    times_ok = all(type(fields[k]) is int and fields[k] >= 0 for k in ("issued_ms", "expires_ms"))
    if not keys_ok or not times_ok or not _valid_name(fields["name"]):
        raise TrustError("malformed_certificate", "certificate has a field of the wrong type")
    return Certificate(
        federation_public_key=fields["federation"],
        node_public_key=fields["node"],
        name=fields["name"],
        issued_at=fields["issued_ms"] / 1000.0,
        expires_at=fields["expires_ms"] / 1000.0,
        signed_bytes=bytes(signed),
        signature=bytes(data[-64:]),
    )


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name.isprintable()


def _valid_reason(reason: object) -> bool:
    return reason is None or (
        isinstance(reason, str) and len(reason) <= MAX_REASON_CHARS and reason.isprintable()
    )


@dataclasses.dataclass(frozen=True, slots=True)
class RevocationList:
    """A federation's list of withdrawn members (see `parse_revocations`)."""

    federation_public_key: bytes
    serial: int
    issued_at: float  # seconds since the epoch
    revoked: Mapping[bytes, str | None]  # node public key -> reason
    data: bytes  # the whole list as signed and sent

    @property
    def federation_id(self) -> str:
        return node_id_for(self.federation_public_key)

    def newer_than(self, other: RevocationList | None) -> bool:
        """True when this list replaces ``other``: a larger serial (ties: the larger bytes, so
        that every node settles on the same list)."""
        if other is None:
            return True
        return (self.serial, self.data) > (other.serial, other.data)


def parse_revocations(data: bytes, federation_public_key: bytes | None) -> RevocationList:
    """Decode and verify a revocation list signed by ``federation_public_key``.

    With None, the list is checked against the federation key it names itself: good for showing
    a list, never for trusting one.

    Raises `TrustError` with reason ``malformed_revocations`` (size, layout, field types),
    ``foreign_revocations`` (another federation's list) or ``forged_revocations`` (signature).
    """
    trailer = 2 + 64
    if not MAX_REVOCATION_BYTES >= len(data) > trailer or data[-trailer:-64] != b"\xc4\x40":
        raise TrustError(
            "malformed_revocations",
            f"revocation list has the wrong size or layout (at most {MAX_REVOCATION_BYTES} bytes)",
        )
    signed = bytes(data[:-trailer])
    try:
        fields = unpack(signed, _REVOCATION_LIMITS)
    except WireError as exc:
        raise TrustError("malformed_revocations", f"revocation list is not valid: {exc}") from None
    if not isinstance(fields, dict) or sorted(fields) != sorted(_REVOCATION_FIELDS):
        raise TrustError(
            "malformed_revocations", f"revocation list fields must be {_REVOCATION_FIELDS}"
        )
    if fields["v"] != REVOCATION_VERSION:
        raise TrustError("malformed_revocations", f"revocation list version {fields['v']!r}")
    ints_ok = all(
        type(fields[k]) is int and 0 <= fields[k] < 2**63 for k in ("serial", "issued_ms")
    )
    federation = fields["federation"]
    entries = fields["revoked"]
    if not ints_ok or not isinstance(federation, bytes) or len(federation) != 32:
        raise TrustError("malformed_revocations", "revocation list has a field of the wrong type")
    if not isinstance(entries, list):
        raise TrustError("malformed_revocations", "revoked must be a list of [key, reason]")
    revoked: dict[bytes, str | None] = {}
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], bytes)
            and len(entry[0]) == 32
            and _valid_reason(entry[1])
            and entry[0] not in revoked
        ):
            raise TrustError(
                "malformed_revocations",
                "each revoked entry must be [32-byte key, reason or nil], keys listed once",
            )
        revoked[entry[0]] = entry[1]
    if federation_public_key is None:
        federation_public_key = federation
    if federation != bytes(federation_public_key):
        raise TrustError(
            "foreign_revocations",
            f"revocation list of federation {node_id_for(federation)[:8]}, "
            f"not {node_id_for(federation_public_key)[:8]}",
        )
    to_verify = signing_input(Domain.REVOCATION, signed)
    if not verify_signature(federation, bytes(data[-64:]), to_verify):
        raise TrustError("forged_revocations", "revocation list has an invalid signature")
    return RevocationList(
        federation_public_key=federation,
        serial=fields["serial"],
        issued_at=fields["issued_ms"] / 1000.0,
        revoked=revoked,
        data=bytes(data),
    )


class FederationAuthority:
    """The operator's federation key, which admits nodes by signing their certificates."""

    __slots__ = ("_key",)

    def __init__(self, key: NodeIdentity) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> FederationAuthority:
        return cls(NodeIdentity.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> FederationAuthority:
        return cls(NodeIdentity.from_seed(seed))

    @classmethod
    def load(cls, directory: Path) -> FederationAuthority:
        """Load ``directory/federation.key``; refuses a key file that others can read."""
        path = Path(directory) / FEDERATION_KEY_FILE
        private_key = load_private_key(
            path, create_command=f"p2pfl federation init --dir {directory}"
        )
        return cls(NodeIdentity(private_key))

    def save(self, directory: Path, *, force: bool = False) -> Path:
        """Write the federation key to ``directory/federation.key`` (0600, atomic)."""
        path = Path(directory) / FEDERATION_KEY_FILE
        save_private_key(self._private_key(), path, force=force, what="federation key")
        return path

    def _private_key(self) -> Ed25519PrivateKey:
        return self._key._private_key

    @property
    def public_key(self) -> bytes:
        return self._key.public_key

    @property
    def federation_id(self) -> str:
        return self._key.node_id

    def admit(
        self,
        node_public_key: bytes,
        *,
        name: str,
        expires_at: float,
        issued_at: float | None = None,
    ) -> bytes:
        """Sign a membership certificate for ``node_public_key``; returns its bytes."""
        if len(node_public_key) != 32:
            raise ValueError("node_public_key must be a 32-byte Ed25519 public key")
        if not _valid_name(name):
            raise ValueError(f"name must be 1-{MAX_NAME_CHARS} printable characters")
        issued = time.time() if issued_at is None else issued_at
        if expires_at <= issued:
            raise ValueError("expires_at must be after the issue time")
        fields = {
            "v": CERTIFICATE_VERSION,
            "federation": self.public_key,
            "node": bytes(node_public_key),
            "name": name,
            "issued_ms": round(issued * 1000),
            "expires_ms": round(expires_at * 1000),
        }
        signed = msgpack.packb(fields, use_bin_type=True)
        signature = self._key.sign(signing_input(Domain.CERTIFICATE, signed))
        return signed + b"\xc4\x40" + signature

    def revoke(
        self,
        revoked: Mapping[bytes, str | None],
        *,
        serial: int,
        issued_at: float | None = None,
    ) -> bytes:
        """Sign a revocation list withdrawing ``revoked`` (node key -> reason); its bytes.

        The list replaces every earlier one: include everything still revoked, and give it a
        serial above the last list's (`p2pfl federation revoke` does both).
        """
        if type(serial) is not int or not 0 <= serial < 2**63:
            raise ValueError("serial must be an int in [0, 2**63)")
        if len(revoked) > MAX_REVOKED_KEYS:
            raise ValueError(f"a revocation list holds at most {MAX_REVOKED_KEYS} keys")
        entries = []
        for key, reason in revoked.items():
            if len(key) != 32:
                raise ValueError("revoked keys must be 32-byte Ed25519 public keys")
            if not _valid_reason(reason):
                raise ValueError(f"reason must be at most {MAX_REASON_CHARS} printable characters")
            entries.append([bytes(key), reason])
        issued = time.time() if issued_at is None else issued_at
        fields = {
            "v": REVOCATION_VERSION,
            "federation": self.public_key,
            "serial": serial,
            "issued_ms": round(issued * 1000),
            "revoked": entries,
        }
        signed = msgpack.packb(fields, use_bin_type=True)
        signature = self._key.sign(signing_input(Domain.REVOCATION, signed))
        data: bytes = signed + b"\xc4\x40" + signature
        if len(data) > MAX_REVOCATION_BYTES:
            raise ValueError(f"revocation list of {len(data)} bytes > {MAX_REVOCATION_BYTES}")
        return data


class TrustPolicy:
    """Decides whether a peer's public key (and certificate) may take part."""

    __slots__ = ("_allowed", "federation_id", "federation_public_key", "mode", "revocations")

    def __init__(
        self,
        mode: TrustMode,
        *,
        allowed: dict[bytes, str | None] | None = None,
        federation_public_key: bytes | None = None,
    ) -> None:
        self.mode = mode
        self._allowed = dict(allowed or {})
        self.federation_public_key = federation_public_key
        self.federation_id = (
            None if federation_public_key is None else node_id_for(federation_public_key)
        )
        self.revocations: RevocationList | None = None
        """The newest verified revocation list (federation mode); `check` refuses its keys."""

    @classmethod
    def open(cls) -> TrustPolicy:
        """Accept everyone. Show `OPEN_MODE_WARNING` wherever this policy is in use."""
        return cls(TrustMode.OPEN)

    @classmethod
    def allowlist(cls, public_keys: Iterable[bytes]) -> TrustPolicy:
        allowed: dict[bytes, str | None] = {}
        for key in public_keys:
            if len(key) != 32:
                raise ValueError("allowlist keys must be 32-byte Ed25519 public keys")
            allowed[bytes(key)] = None
        return cls(TrustMode.ALLOWLIST, allowed=allowed)

    @classmethod
    def load_allowlist(cls, path: Path) -> TrustPolicy:
        """Read an allowlist file (one hex public key per line, optional name, # comments)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustError("bad_allowlist", f"cannot read allowlist {path}: {exc}") from exc
        allowed: dict[bytes, str | None] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key_hex, _, name = line.partition(" ")
            try:
                key = bytes.fromhex(key_hex)
            except ValueError:
                key = b""
            if len(key) != 32:
                raise TrustError(
                    "bad_allowlist",
                    f"{path}:{number}: expected a 64-hex-digit public key (from `p2pfl keys show`),"
                    f" got {key_hex[:80]!r}",
                )
            allowed[key] = name.strip() or None
        if not allowed:
            raise TrustError(
                "bad_allowlist",
                f"{path} lists no keys: add one public key per line, or fix the path",
            )
        return cls(TrustMode.ALLOWLIST, allowed=allowed)

    @classmethod
    def federation(cls, federation_public_key: bytes) -> TrustPolicy:
        if len(federation_public_key) != 32:
            raise ValueError("federation_public_key must be a 32-byte Ed25519 public key")
        return cls(TrustMode.FEDERATION, federation_public_key=bytes(federation_public_key))

    def adopt_revocations(self, data: bytes) -> RevocationList | None:
        """Verify a revocation list and keep it if it is newer than the current one.

        Returns the list when adopted, None when it is not newer (older or the same); raises
        `TrustError` when it is invalid, or when this policy has no federation key.
        """
        if self.federation_public_key is None:
            raise TrustError(
                "no_federation", f"revocation lists need trust mode federation, not {self.mode}"
            )
        revocations = parse_revocations(data, self.federation_public_key)
        if not revocations.newer_than(self.revocations):
            return None
        self.revocations = revocations
        return revocations

    def check(self, public_key: bytes, certificate: bytes | None, *, now: float) -> str | None:
        """Accept ``public_key`` or raise `TrustError`; returns the member's name if known."""
        if self.mode is TrustMode.OPEN:
            return None
        if self.revocations is not None and bytes(public_key) in self.revocations.revoked:
            reason = self.revocations.revoked[bytes(public_key)]
            raise TrustError(
                "revoked",
                f"{node_id_for(public_key)[:8]} was revoked by the federation"
                + (f" ({reason})" if reason else ""),
            )
        if self.mode is TrustMode.ALLOWLIST:
            if bytes(public_key) not in self._allowed:
                raise TrustError(
                    "not_allowlisted", f"{node_id_for(public_key)[:8]} is not allowlisted"
                )
            return self._allowed[bytes(public_key)]
        return self._check_certificate(public_key, certificate, now=now)

    def expires_at(self, certificate: bytes | None) -> float | None:
        """When a member admitted with ``certificate`` stops being trusted (None: never).

        Only federation trust expires; call it for certificates `check` accepted.
        """
        if self.mode is not TrustMode.FEDERATION or certificate is None:
            return None
        try:
            return parse_certificate(certificate).expires_at
        except TrustError:
            return None

    def _check_certificate(
        self, public_key: bytes, certificate: bytes | None, *, now: float
    ) -> str:
        who = node_id_for(public_key)[:8]
        if certificate is None:
            raise TrustError("missing_certificate", f"{who} presented no federation certificate")
        cert = parse_certificate(certificate)
        if cert.federation_public_key != self.federation_public_key:
            raise TrustError(
                "foreign_certificate",
                f"{who} belongs to federation {cert.federation_id[:8]}, not {self.federation_id}",
            )
        to_verify = signing_input(Domain.CERTIFICATE, cert.signed_bytes)
        assert self.federation_public_key is not None
        if not verify_signature(self.federation_public_key, cert.signature, to_verify):
            raise TrustError("forged_certificate", f"certificate of {who} has an invalid signature")
        if cert.node_public_key != bytes(public_key):
            raise TrustError(
                "certificate_key_mismatch", f"{who} presented the certificate of {cert.node_id[:8]}"
            )
        if now >= cert.expires_at:
            raise TrustError(
                "expired_certificate",
                f"certificate of {who} ({cert.name}) expired at {_utc(cert.expires_at)}; "
                "the operator must admit the node again",
            )
        if now + ISSUE_SKEW_S < cert.issued_at:
            raise TrustError(
                "certificate_not_yet_valid",
                f"certificate of {who} is issued at {_utc(cert.issued_at)}, in the future",
            )
        return cert.name


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))
