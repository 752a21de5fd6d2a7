"""Domain separation: a signature made for one purpose is never valid for another."""

from __future__ import annotations

import enum
import hashlib


class Domain(enum.Enum):
    """The purpose a signature is made for; the value is the domain string that is signed."""

    MESSAGE = b"p2pfl/message/v1"  # envelopes carrying protocol messages between peers
    SIGNALING = b"p2pfl/signaling/v1"  # envelopes carrying WebRTC offers/answers (SDP)
    DISCOVERY = b"p2pfl/discovery/v1"  # mDNS adverts (p2pfl.daemon.adverts)
    CERTIFICATE = b"p2pfl/certificate/v1"  # federation membership certificates
    REVOCATION = b"p2pfl/revocation/v1"  # federation revocation lists


def signing_input(domain: Domain, *signed_bytes: bytes | memoryview) -> bytes:
    """What the Ed25519 key actually signs: ``domain || 0x00 || SHA-256(signed_bytes)``.

    ``signed_bytes`` may come in several chunks; they are hashed as if concatenated. Hashing
    first keeps signing and verifying a 34 MB model to one fast SHA-256 pass each (Ed25519 alone
    would hash the whole message with SHA-512 twice to sign).
    """
    digest = hashlib.sha256()
    for chunk in signed_bytes:
        digest.update(chunk)
    return domain.value + b"\x00" + digest.digest()
