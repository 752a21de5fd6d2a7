"""Signed mDNS adverts: what a node announces, and the checks a receiver makes (sans-IO).

An advert says "node ``id`` (key ``pk``) listens for signaling at these IPv4 addresses and this
port, speaks protocol ``v`` in federation ``fed``, from ``iss`` until ``exp``", signed by the
node key over ``signing_input(Domain.DISCOVERY, S)`` with

    S = msgpack array(9) [id, pk (bin 32), [address, ...], port, fed ("" for none), v,
                          issued_ms, expires_ms, cert (bin, or nil)]

``cert`` is the node's federation membership certificate when it has one, so that in federation
mode a receiver can refuse to dial non-members before any connection is made. The TXT record
carries each field as text (see ``Advert.properties``); the receiver re-encodes ``S`` from the
parsed fields, which it checks to be in canonical form, so changing any character of the
record refuses the advert.

``AdvertVerifier.check`` guarantees, for every candidate it returns: the key hashes to the id;
the signature by that key covers the addresses, port, federation id, version and times; the
advert is not expired and was not issued more than ``ADVERT_SKEW_S`` in the future; its lifetime
is at most ``MAX_ADVERT_VALIDITY_S``; the federation id is ours (when we have one); the key is
accepted by our trust policy (certificate or allowlist; anyone in open mode); mDNS served it at
one of the signed addresses and the signed port; and no newer advert of that node has been
accepted before (a replayed older advert never overrides a newer one). The candidate's address is
always one the node signed, never a bare A record. Anything else raises ``DiscoveryError`` with
the reason that the caller counts (stage ``discovery``).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from p2pfl.identity import NodeIdentity, node_id_for, verify_signature
from p2pfl.trust import MAX_CERTIFICATE_BYTES, TrustError, TrustPolicy
from p2pfl.wire import Domain, pack, signing_input

__all__ = [
    "ADVERT_REFRESH_S",
    "ADVERT_SKEW_S",
    "ADVERT_VALIDITY_S",
    "MAX_ADVERT_ADDRESSES",
    "MAX_ADVERT_VALIDITY_S",
    "PROTOCOL_VERSION",
    "Advert",
    "AdvertVerifier",
    "DiscoveryError",
    "PeerCandidate",
    "ResolvedAdvert",
    "advert_signed_bytes",
]

PROTOCOL_VERSION = 2  # 2: DATA frames carry a CRC-32C digest (datachannel.py)
ADVERT_VALIDITY_S = 3600.0  # a signed advert is good for an hour ...
ADVERT_REFRESH_S = 900.0  # ... and re-signed every 15 minutes: receivers whose clocks run up to
# 45 minutes ahead still accept it
ADVERT_SKEW_S = 300.0  # an advert issued up to 5 minutes in the future (clock differences) is fine
MAX_ADVERT_VALIDITY_S = 2 * 3600.0  # bounds replay of a captured advert, whoever signed it
MAX_ADVERT_ADDRESSES = 8
_TXT_STRING_BYTES = 255  # one DNS character-string, "key=value" included
_CERT_CHUNK_CHARS = 240  # base64 characters per certificate TXT string (c0, c1, ...)
_MAX_CERT_CHUNKS = -(-((MAX_CERTIFICATE_BYTES + 2) // 3 * 4) // _CERT_CHUNK_CHARS)
_MAX_KNOWN_NODES = 4096


class DiscoveryError(ValueError):
    """A malformed or refused advert or static peer entry; ``reason`` is a short slug."""

    def __init__(self, reason: str, message: str, *, peer: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.peer = peer  # the node id, once its key has signed what is refused


@dataclass(frozen=True, slots=True)
class PeerCandidate:
    """Where a peer might be reached. ``node_id``/``public_key`` are None for a static peer
    until signaling has proven who answers there."""

    host: str
    port: int
    node_id: str | None = None
    public_key: bytes | None = None
    source: str = "mdns"  # "mdns" | "static" | "invite"


def advert_signed_bytes(
    node_id: str,
    public_key: bytes,
    addresses: Sequence[str],
    port: int,
    federation_id: str,
    protocol_version: int,
    issued_ms: int,
    expires_ms: int,
    certificate: bytes | None,
) -> bytes:
    """``S``, the bytes an advert's signature covers (module docstring)."""
    return pack(
        [
            node_id,
            bytes(public_key),
            list(addresses),
            port,
            federation_id,
            protocol_version,
            issued_ms,
            expires_ms,
            None if certificate is None else bytes(certificate),
        ]
    )


@dataclass(frozen=True, slots=True)
class Advert:
    """What this node announces (the signed TXT record comes from ``properties``)."""

    host: str  # the address peers should use; "0.0.0.0" means every local IPv4 address
    signaling_port: int
    federation_id: str | None = None
    certificate: bytes | None = None  # membership certificate, carried when the node has one
    protocol_version: int = PROTOCOL_VERSION

    def properties(
        self,
        identity: NodeIdentity,
        addresses: Sequence[str],
        now: float,
        *,
        validity_s: float = ADVERT_VALIDITY_S,
    ) -> dict[str, str]:
        """The TXT record, signed by ``identity`` for ``addresses`` from ``now`` on."""
        if not 0 < len(addresses) <= MAX_ADVERT_ADDRESSES:
            raise ValueError(f"an advert names 1-{MAX_ADVERT_ADDRESSES} addresses")
        issued_ms = int(now * 1000)
        expires_ms = issued_ms + int(validity_s * 1000)
        fed = self.federation_id or ""
        signed = advert_signed_bytes(
            identity.node_id,
            identity.public_key,
            addresses,
            self.signaling_port,
            fed,
            self.protocol_version,
            issued_ms,
            expires_ms,
            self.certificate,
        )
        txt = {
            "id": identity.node_id,
            "pk": identity.public_key.hex(),
            "a": ",".join(addresses),
            "port": str(self.signaling_port),
            "v": str(self.protocol_version),
            "fed": fed,
            "iss": str(issued_ms),
            "exp": str(expires_ms),
            "sig": identity.sign(signing_input(Domain.DISCOVERY, signed)).hex(),
        }
        if self.certificate is not None:
            text = base64.b64encode(self.certificate).decode("ascii")
            for i in range(0, len(text), _CERT_CHUNK_CHARS):
                txt[f"c{i // _CERT_CHUNK_CHARS}"] = text[i : i + _CERT_CHUNK_CHARS]
        for key, value in txt.items():
            if len(key) + 1 + len(value) > _TXT_STRING_BYTES:
                raise ValueError(f"advert field {key!r} does not fit one TXT string")
        return txt


@dataclass(frozen=True, slots=True)
class ResolvedAdvert:
    """What mDNS resolved for one service instance: all of it untrusted."""

    properties: Mapping[bytes, bytes | None]  # the TXT record
    addresses: tuple[str, ...]  # IPv4 A records of the service's host
    port: int  # the SRV record's port


def _text(properties: Mapping[bytes, bytes | None], key: str) -> str:
    value = properties.get(key.encode())
    if value is None:
        raise DiscoveryError("malformed", f"advert has no {key!r} field")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise DiscoveryError("malformed", f"advert field {key!r} is not ASCII") from None


def _canonical_int(text: str, key: str) -> int:
    if not text.isdigit() or (text != "0" and text.startswith("0")) or len(text) > 19:
        raise DiscoveryError("malformed", f"advert field {key!r} is not a plain number")
    return int(text)


def _addresses(text: str) -> list[str]:
    parts = text.split(",")
    if not 0 < len(parts) <= MAX_ADVERT_ADDRESSES:
        raise DiscoveryError("malformed", f"advert names {len(parts)} addresses")
    for part in parts:
        try:
            canonical: str | None = str(ipaddress.IPv4Address(part))
        except ValueError:
            canonical = None
        if canonical != part:
            raise DiscoveryError("malformed", f"advert address {part[:20]!r} is not IPv4")
    return parts


def _certificate(properties: Mapping[bytes, bytes | None]) -> bytes | None:
    chunks = []
    for i in range(_MAX_CERT_CHUNKS + 1):
        if f"c{i}".encode() not in properties:
            break
        chunks.append(_text(properties, f"c{i}"))
    if not chunks:
        return None
    try:
        certificate = base64.b64decode("".join(chunks), validate=True)
    except (binascii.Error, ValueError):
        raise DiscoveryError("malformed", "advert certificate is not base64") from None
    if len(certificate) > MAX_CERTIFICATE_BYTES:
        raise DiscoveryError("malformed", "advert certificate is too long")
    return certificate


class AdvertVerifier:
    """Checks resolved adverts for one node (see the module docstring for what it guarantees).

    Remembers, per node id (the most recent ``max_known`` ids), the issue time of the newest
    advert it accepted; only an accepted advert changes that state. ``trust`` may be replaced
    at any time (a reloaded allowlist).
    """

    def __init__(
        self,
        own_node_id: str,
        trust: TrustPolicy,
        *,
        skew_s: float = ADVERT_SKEW_S,
        max_validity_s: float = MAX_ADVERT_VALIDITY_S,
        max_known: int = _MAX_KNOWN_NODES,
    ) -> None:
        self._own = own_node_id
        self.trust = trust
        self._skew_ms = int(skew_s * 1000)
        self._max_validity_ms = int(max_validity_s * 1000)
        self._max_known = max_known
        self._newest: OrderedDict[str, int] = OrderedDict()  # node id -> issued_ms

    def newest_issued_ms(self, node_id: str) -> int | None:
        return self._newest.get(node_id)

    def check(self, advert: ResolvedAdvert, now: float) -> PeerCandidate:
        """The candidate this advert proves, or ``DiscoveryError(reason)``."""
        fields = _parse_signed(advert.properties)
        try:
            return self._check_claims(fields, advert, now)
        except DiscoveryError as exc:
            exc.peer = fields.node_id  # its own key signed what is refused
            raise

    def _check_claims(
        self, fields: _SignedAdvert, advert: ResolvedAdvert, now: float
    ) -> PeerCandidate:
        node_id, short = fields.node_id, fields.node_id[:8]
        if node_id == self._own:
            raise DiscoveryError("own_advert", "our own advert, served under another name")
        if fields.version != PROTOCOL_VERSION:
            raise DiscoveryError("version_mismatch", f"advert speaks protocol {fields.version}")
        if not 0 < fields.expires_ms - fields.issued_ms <= self._max_validity_ms:
            raise DiscoveryError("bad_validity", f"advert of {short} has a bad lifetime")
        now_ms = int(now * 1000)
        if now_ms >= fields.expires_ms:
            raise DiscoveryError("expired", f"advert of {short} has expired")
        if fields.issued_ms > now_ms + self._skew_ms:
            raise DiscoveryError("from_future", f"advert of {short} is issued in the future")
        own_fed = self.trust.federation_id
        if own_fed is not None and fields.federation_id != own_fed:
            raise DiscoveryError("other_federation", f"advert of {short} is another federation")
        try:
            self.trust.check(fields.public_key, fields.certificate, now=now)
        except TrustError as exc:
            raise DiscoveryError(exc.reason, f"advert of {short}: {exc}") from None
        port = fields.port
        host = next((a for a in fields.addresses if a in advert.addresses), None)
        if host is None or advert.port != port:
            raise DiscoveryError(
                "address_mismatch",
                f"advert of {short} is served at {','.join(advert.addresses)}:{advert.port},"
                f" not at the signed {','.join(fields.addresses)}:{port}",
            )
        newest = self._newest.get(node_id)
        if newest is not None and fields.issued_ms < newest:
            raise DiscoveryError("replayed", f"advert of {short} is older than one seen")
        self._newest[node_id] = fields.issued_ms
        self._newest.move_to_end(node_id)
        if len(self._newest) > self._max_known:
            self._newest.popitem(last=False)
        return PeerCandidate(host, port, node_id, fields.public_key, "mdns")


@dataclass(frozen=True, slots=True)
class _SignedAdvert:
    """The fields of an advert whose signature verified."""

    node_id: str
    public_key: bytes
    addresses: list[str]
    port: int
    federation_id: str
    version: int
    issued_ms: int
    expires_ms: int
    certificate: bytes | None


def _parse_signed(props: Mapping[bytes, bytes | None]) -> _SignedAdvert:
    """Parse the TXT fields (canonical forms only) and verify the signature over them."""
    node_id, key_hex = _text(props, "id"), _text(props, "pk")
    try:
        public_key = bytes.fromhex(key_hex)
    except ValueError:
        public_key = b""
    if len(public_key) != 32 or public_key.hex() != key_hex:
        raise DiscoveryError("malformed", "advert public key is not 64 lowercase hex digits")
    if node_id_for(public_key) != node_id:
        raise DiscoveryError("id_key_mismatch", f"advert id {node_id[:8]} does not match its key")
    if b"sig" not in props:
        raise DiscoveryError("unsigned", f"advert of {node_id[:8]} carries no signature")
    fields = _SignedAdvert(
        node_id=node_id,
        public_key=public_key,
        addresses=_addresses(_text(props, "a")),
        port=_canonical_int(_text(props, "port"), "port"),
        federation_id=_text(props, "fed"),
        version=_canonical_int(_text(props, "v"), "v"),
        issued_ms=_canonical_int(_text(props, "iss"), "iss"),
        expires_ms=_canonical_int(_text(props, "exp"), "exp"),
        certificate=_certificate(props),
    )
    if not 0 < fields.port < 65536:
        raise DiscoveryError("malformed", f"advert port {fields.port} out of range")
    try:
        signature = bytes.fromhex(_text(props, "sig"))
    except ValueError:
        signature = b""
    signed = advert_signed_bytes(
        node_id,
        public_key,
        fields.addresses,
        fields.port,
        fields.federation_id,
        fields.version,
        fields.issued_ms,
        fields.expires_ms,
        fields.certificate,
    )
    if not verify_signature(public_key, signature, signing_input(Domain.DISCOVERY, signed)):
        raise DiscoveryError("bad_signature", f"advert of {node_id[:8]} has a bad signature")
    return fields
