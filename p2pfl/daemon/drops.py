"""Every refusal and drop in the daemon, counted once, by stage and reason; and per-peer scopes.

A daemon faces whatever reaches its ports, so everything it turns away is normal work that an
operator must be able to see. ``DropLog.count(stage, reason, peer)`` is the one place a drop is
recorded: a total per ``(stage, reason)``, a total per peer and stage (bounded: the oldest peer is
forgotten first), and hooks (the Prometheus counter family ``p2pfl_dropped_total{stage,reason}``
is one). Count each drop where it is decided, exactly once.

Stages, from the outside in:

``resource``   work shed before any check: descriptor or connection caps, full queues
``endpoint``   the operator's endpoints: control socket and metrics HTTP connections
``discovery``  mDNS adverts (unsigned, malformed, another federation, ...)
``signaling``  signaling connections and requests (resets, timeouts, bad signatures, caps, ...)
``link``       WebRTC links and data-channel frames/transfers (bad frames, incomplete transfers)
``trust``      live links closed for trust (certificate expired, member revoked)
``envelope``   signed messages on a link (bad signature, replay, stale, oversized, ...)
``update``     model updates and claims inside valid messages (shape, norm, claims out of bounds)

``contained(...)`` runs the work for one remote party (a signaling connection, a dial, a link, a
transfer) as a supervised scope: any ``Exception`` from it is logged once with the peer and the
stage, counted as ``(stage, "error_<ExceptionType>")``, and ends that scope alone. Cancellation
(``trio.Cancelled``, a ``BaseException``) passes through untouched, so shutdown still works.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["STAGES", "DropLog", "contained"]

STAGES = (
    "resource",
    "endpoint",
    "discovery",
    "signaling",
    "link",
    "trust",
    "envelope",
    "update",
)
_MAX_PEERS = 1024
log = logging.getLogger(__name__)

Hook = Callable[[str, str, int], None]


class DropLog:
    """Counts of everything dropped or refused, by stage and reason, and per peer and stage."""

    def __init__(self, *, max_peers: int = _MAX_PEERS) -> None:
        self.totals: Counter[tuple[str, str]] = Counter()
        self._by_peer: OrderedDict[str, Counter[str]] = OrderedDict()
        self._max_peers = max_peers
        self._hooks: list[Hook] = []

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook(stage, reason, n)`` on every count (e.g. to feed Prometheus)."""
        self._hooks.append(hook)

    def count(self, stage: str, reason: str, peer: str | None = None, n: int = 1) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown drop stage {stage!r}; one of {', '.join(STAGES)}")
        self.totals[stage, reason] += n
        if peer:
            per = self._by_peer.get(peer)
            if per is None:
                if len(self._by_peer) >= self._max_peers:
                    self._by_peer.popitem(last=False)
                per = self._by_peer[peer] = Counter()
            else:
                self._by_peer.move_to_end(peer)
            per[stage] += n
        for hook in self._hooks:
            hook(stage, reason, n)

    def get(self, stage: str, reason: str) -> int:
        return self.totals[stage, reason]

    def stage_totals(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (stage, _), n in self.totals.items():
            out[stage] += n
        return dict(out)

    def peer_totals(self, peer: str) -> dict[str, int]:
        return dict(self._by_peer.get(peer, {}))

    def snapshot(self) -> dict[str, int]:
        """``{"stage/reason": n}``, sorted: for status replies and tests."""
        return {f"{s}/{r}": n for (s, r), n in sorted(self.totals.items())}


async def contained(
    drops: DropLog,
    stage: str,
    peer: str | None,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
) -> None:
    """Run ``await fn(*args)`` as one remote party's scope: no ``Exception`` escapes it."""
    try:
        await fn(*args)
    except Exception as exc:  # the containment boundary: counted and logged, never re-raised
        reason = f"error_{type(exc).__name__}"
        drops.count(stage, reason, peer)
        log.warning(
            "%s scope ended by %s",
            stage,
            type(exc).__name__,
            extra={"peer": (peer or "?")[:16], "stage": stage, "error": _described(exc)[:200]},
        )


def _described(exc: BaseException) -> str:
    """``exc`` for the log; a group (a nursery's) by the exceptions inside it, which its own
    text ("Exceptions from Trio nursery (1 sub-exception)") does not name."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_described(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
