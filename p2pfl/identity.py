"""Node identity: one Ed25519 key per node, kept in the state directory.

A node is known by its public key. Its *node id* is derived from that key (see `node_id_for`):
32 lowercase base32 characters, stable, printable, and ordered the same way everywhere (plain
string comparison), so rules such as "the node with the smaller id offers" need no extra field.
The first 8 characters are the short form for logs and tables.

The key file is PEM (PKCS#8, unencrypted) so that standard tools can read it; it is written
atomically with mode 0600, and loading refuses a file that group or others can read.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pfl.files import atomic_write

KEY_FILE = "node.key"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NODE_ID_CHARS = 32
SHORT_ID_CHARS = 8
_NODE_ID_DOMAIN = b"p2pfl/node-id/v1\x00"


class IdentityError(Exception):
    """A key file is missing, unreadable, malformed or unsafe; the message says how to fix it."""


def node_id_for(public_key: bytes) -> str:
    """The node id of a 32-byte Ed25519 public key.

    base32 (lowercase, no padding) of the first 20 bytes of SHA-256(domain || key): 32 characters
    from ``a-z2-7``. 160 bits leave no practical room for collisions among the nodes of a LAN.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    digest = hashlib.sha256(_NODE_ID_DOMAIN + bytes(public_key)).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``.

    Never raises for malformed input: a key or signature of the wrong size is simply invalid.
    """
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        _public_key(bytes(public_key)).verify(bytes(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


class NodeIdentity:
    """An Ed25519 key pair with its derived node id."""

    __slots__ = ("_private_key", "node_id", "public_key", "short_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id: str = node_id_for(self.public_key)
        self.short_id: str = self.node_id[:SHORT_ID_CHARS]

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id})"

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeIdentity:
        """The identity whose 32-byte private seed is ``seed`` (for test vectors and tests)."""
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed has 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, state_dir: Path) -> NodeIdentity:
        """Load the node key from ``state_dir``; refuses a key file others can read."""
        command = f"p2pfl keys init --state-dir {state_dir}"
        return cls(load_private_key(Path(state_dir) / KEY_FILE, create_command=command))

    @classmethod
    def load_or_create(cls, state_dir: Path) -> NodeIdentity:
        """Load the node key, or generate and save one if the state directory has none."""
        if (Path(state_dir) / KEY_FILE).exists():
            return cls.load(state_dir)
        identity = cls.generate()
        identity.save(state_dir)
        return identity

    def save(self, state_dir: Path, *, force: bool = False) -> Path:
        """Write the key to ``state_dir/node.key`` (0600, atomic); returns the path.

        Refuses to replace an existing key unless ``force``: a new key is a new node id.
        """
        path = Path(state_dir) / KEY_FILE
        save_private_key(self._private_key, path, force=force, what="node key")
        return path

    def sign(self, data: bytes) -> bytes:
        """Raw Ed25519 signature (64 bytes) of ``data``, already domain-separated by the caller."""
        return self._private_key.sign(data)


def save_private_key(key: Ed25519PrivateKey, path: Path, *, force: bool, what: str) -> None:
    """Write ``key`` as PKCS#8 PEM to ``path`` (mode 0600, atomically, directory made 0700)."""
    if path.exists() and not force:
        raise IdentityError(
            f"{path} already exists; refusing to overwrite the {what} "
            "(pass --force to replace it: the old key and its identity are lost)"
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(path, pem, mode=0o600)
    except OSError as exc:
        raise IdentityError(f"cannot write the {what} to {path}: {exc.strerror or exc}") from exc


def load_private_key(path: Path, *, create_command: str) -> Ed25519PrivateKey:
    """Read an Ed25519 private key file, refusing one that group or others can read.

    ``create_command`` is the command that makes such a key (``p2pfl keys init --state-dir
    DIR``): the messages tell a person to run it, or it with ``--force`` to replace a bad key.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise IdentityError(f"no key at {path}; create one with `{create_command}`") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # before fdopen, which refuses a directory itself
        os.close(fd)
        raise IdentityError(f"{path} is not a regular file; point to the key file itself")
    with os.fdopen(fd, "rb") as file:
        if info.st_mode & 0o077:
            raise IdentityError(
                f"{path} can be read by group or others (mode {stat.S_IMODE(info.st_mode):03o}); "
                f"a private key must stay private: run `chmod 600 {path}`"
            )
        data = file.read(64 * 1024)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"{path} is not a readable PEM private key ({exc}); restore it from a backup, "
            f"or replace it with `{create_command} --force` (a new key is a new identity)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
