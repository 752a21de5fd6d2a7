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

Allowlist file: UTF-8 text, one trusted node per line: the 64-hex-digit public key (as printed by
`p2pfl keys show`), optionally followed by whitespace and a name; ``#`` starts a comment.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Iterable
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfl.identity import (
    IdentityError,
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
        try:
            private_key = load_private_key(path, create_hint=directory)
        except IdentityError as exc:
            message = str(exc).replace("p2pfl keys init", "p2pfl federation init")
            raise IdentityError(message) from None
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


class TrustPolicy:
    """Decides whether a peer's public key (and certificate) may take part."""

    __slots__ = ("_allowed", "federation_id", "federation_public_key", "mode")

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

    def check(self, public_key: bytes, certificate: bytes | None, *, now: float) -> str | None:
        """Accept ``public_key`` or raise `TrustError`; returns the member's name if known."""
        if self.mode is TrustMode.OPEN:
            return None
        if self.mode is TrustMode.ALLOWLIST:
            if bytes(public_key) not in self._allowed:
                raise TrustError(
                    "not_allowlisted", f"{node_id_for(public_key)[:8]} is not allowlisted"
                )
            return self._allowed[bytes(public_key)]
        return self._check_certificate(public_key, certificate, now=now)

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
