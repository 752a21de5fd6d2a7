"""Revocation lists in the daemon: load, keep, store and spread the newest one.

A node learns of a revocation list from three places, and the newest verified one (the largest
serial, see `p2pfl.trust.RevocationList`) wins wherever they meet:

- the file ``[trust] revocations`` (written by `p2pfl federation revoke`), read at start and
  on every SIGHUP;
- its own copy, ``STATE_DIR/revocations.list``: the newest list it adopted, so a restart keeps
  what it learned from peers;
- its peers: on every link up each node sends its list (if it has one) as a signed
  ``trust.revocations`` message, and whenever it adopts a newer list it sends that to every
  connected peer but the one it came from. Lists that are not newer are ignored; invalid ones
  are counted as drops (stage ``update``, the `TrustError` reason) and ignored.

The list lives in the trust policy (``TrustPolicy.revocations``); adopting one re-checks every
live link (`PeerTransport.recheck_trust`), so a revoked member's links close at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import trio

from p2pfl.daemon.config import Config
from p2pfl.daemon.drops import DropLog
from p2pfl.files import atomic_write
from p2pfl.trust import REVOCATIONS_FILE, RevocationList, TrustError, TrustPolicy

__all__ = [
    "REVOCATIONS_KIND",
    "RevocationKeeper",
    "RevocationsMessage",
    "load_revocations",
]

REVOCATIONS_KIND = "trust.revocations"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RevocationsMessage:
    """A revocation list as a message on the data channel (sealed like any other message)."""

    KIND: ClassVar[str] = REVOCATIONS_KIND
    data: bytes

    def to_body(self, encode_weights: Any = None) -> dict[str, Any]:
        return {"list": self.data}


def load_revocations(config: Config, policy: TrustPolicy) -> None:
    """Give ``policy`` the newest of the stored copy and the configured file.

    A bad configured file is a `ConfigError` (file:line: key); a bad stored copy is logged and
    skipped (the peers or the configured file bring the list again).
    """
    stored = config.state_dir / REVOCATIONS_FILE
    try:
        policy.adopt_revocations(stored.read_bytes())
    except FileNotFoundError:
        pass  # none learnt yet
    except (OSError, TrustError) as exc:
        log.warning(
            "stored revocation list skipped", extra={"path": str(stored), "error": str(exc)}
        )
    path = config.trust.revocations
    if path is None:
        return
    try:
        policy.adopt_revocations(path.read_bytes())
    except OSError as exc:
        raise config.error(
            "trust.revocations",
            f"{path}: {exc.strerror}; copy the list from `p2pfl federation revoke` there, or "
            "remove the key",
        ) from None
    except TrustError as exc:
        raise config.error("trust.revocations", f"{path}: {exc} ({exc.reason})") from None


class _Transport(Protocol):
    @property
    def trust(self) -> TrustPolicy: ...
    def set_trust(self, trust: TrustPolicy) -> None: ...
    def connected_peers(self) -> list[str]: ...
    def recheck_trust(self) -> None: ...


Send = Callable[[str, RevocationsMessage], Awaitable[None]]


class RevocationKeeper:
    """Stores and spreads the transport's current revocation list; the driver's side channel.

    The driver hands it ``trust.revocations`` messages (`received`) and link ups (`peer_up`);
    `run` stores each newer list and sends lists out through the driver.
    """

    def __init__(self, transport: _Transport, state_dir: Path, drops: DropLog) -> None:
        self.kinds = frozenset({REVOCATIONS_KIND})
        self.transport = transport
        self.path = state_dir / REVOCATIONS_FILE
        self.drops = drops
        self._known: RevocationList | None = None  # the list last stored and spread
        self._store: RevocationList | None = None
        self._outbox: set[str] = set()
        self._wake = trio.Event()

    @property
    def current(self) -> RevocationList | None:
        return self.transport.trust.revocations

    def use_policy(self, policy: TrustPolicy) -> None:
        """A reloaded policy: it keeps the newest list known, every live link is re-checked
        against it, and a newer list from the configured file is stored and spread."""
        old = self.current
        if old is not None and policy.federation_public_key == old.federation_public_key:
            with contextlib.suppress(TrustError):
                policy.adopt_revocations(old.data)
        self.transport.set_trust(policy)
        self.refresh()

    def refresh(self, source: str | None = None) -> None:
        """The policy may hold a newer list (adopted, or a reload): store it, spread it."""
        current = self.current
        if current is None or (self._known is not None and current.data == self._known.data):
            return
        self._known = self._store = current
        log.info(
            "revocation list adopted",
            extra={"serial": current.serial, "revoked": len(current.revoked), "from": source},
        )
        self.transport.recheck_trust()
        self._outbox.update(p for p in self.transport.connected_peers() if p != source)
        self._wake.set()

    # ---- the driver's side channel -----------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        if self.current is not None:
            self._outbox.add(peer)
            self._wake.set()

    def received(self, peer: str, kind: str, body: Any) -> None:
        data = body.get("list") if isinstance(body, dict) else None
        if not isinstance(data, bytes):
            self.drops.count("update", "malformed_revocations", peer)
            return
        try:
            adopted = self.transport.trust.adopt_revocations(data)
        except TrustError as exc:
            self.drops.count("update", exc.reason, peer)
            log.info("revocation list refused", extra={"peer": peer, "reason": exc.reason})
            return
        if adopted is not None:
            self.refresh(source=peer)

    # ---- storing and sending -----------------------------------------------------------------

    async def run(self, send: Send) -> None:
        """Store each newer list and send the current one to every peer waiting for it."""
        self.refresh()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            store, self._store = self._store, None
            if store is not None:
                try:
                    await trio.to_thread.run_sync(atomic_write, self.path, store.data)
                except OSError as exc:
                    log.error("cannot store the revocation list", extra={"error": str(exc)})
            current, peers = self.current, self._outbox
            self._outbox = set()
            if current is None:
                continue
            message = RevocationsMessage(current.data)
            async with trio.open_nursery() as nursery:
                for peer in sorted(peers):
                    nursery.start_soon(send, peer, message)
