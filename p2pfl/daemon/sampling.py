"""[limits] max_peers in the daemon: a symmetric active view chooses the links, at most
``max_peers`` of them, always.

``SampledLinks`` runs the pure ``p2pfl.protocols.PeerSampling`` machine (the one the virtual
engine runs; see its module for the active and passive views) against the transport, as its
``LinkPolicy``:

- Discovery still learns every member (mDNS adverts and signaling, both signed); those are the
  members the machine admits and fills its passive view from, so a shuffle naming anyone else
  is refused whole.
- **The neighbour request is the link's signaling request.** A ``Connect(peer, priority)`` makes
  the transport dial ``peer`` (``dial``: only members the machine reserved or holds): the node
  with the smaller id sends a signed offer, the other a signed invite, either carrying the
  signed ``priority`` flag (the requester has no open link). The receiver's transport asks
  ``accept(peer, priority)``, which is ``PeerSampling.neighbour_request``: admitted, the offer is
  answered (or the invite acked and the offer sent back); refused, the request gets no reply
  (counted ``link/max_peers``). A request that fails (refused, unreachable, timed out) is
  ``failed`` -> ``PeerSampling.refused``. The link opening (``peer_up``) is ``link_up`` on both
  ends; a link that goes down is ``link_down`` (a passive member is promoted).
- The bound is strict: besides the machine's (open + reserved <= ``max_peers``), ``dial`` and
  ``accept`` refuse while the transport already holds ``max_peers`` links or link attempts to
  others, so a stale attempt (a reservation the machine gave up) never makes it exceed. An
  eviction (``Disconnect``) closes its link before the admitted request is answered.
- Shuffles travel as signed envelopes on the driver's side channel (kinds ``sampling.*``) over
  the links; every refusal is counted in the DropLog (stage ``update``, the machine's reason).
Gossip draws its targets from the links (the driver's peers), as without a bound.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2pfl.daemon.drops import DropLog
from p2pfl.protocols import (
    SHUFFLE_KINDS,
    Connect,
    Disconnect,
    MessageError,
    PeerSampling,
    SamplingAction,
    SamplingConfig,
    SamplingSend,
    decode_shuffle,
)

log = logging.getLogger(__name__)

DISCOVERY_POLL_S = 1.0
"""How often the members discovery knows are handed to the machine."""
LINK_POLL_S = 0.25
"""How often links that went down are looked for (``link_down``)."""


class SampledLinks:
    """The daemon's peer sampling: the side channel for shuffles and the transport's policy."""

    def __init__(
        self,
        node_id: str,
        max_peers: int,
        period: float,
        drops: DropLog,
        rng: random.Random | None = None,
        *,
        join_timeout: float = 25.0,
    ) -> None:
        self.transport: Any = None
        """The ``PeerTransport`` (set once it exists; it asks this object from the start)."""
        self.drops = drops
        self.max_peers = max_peers
        self.kinds = frozenset(SHUFFLE_KINDS)
        # join_timeout: an invite, then the offer back, each within the transport's connect
        # timeout (10 s), and the link seen up.
        config = SamplingConfig(view_size=max_peers, period=period, join_timeout=join_timeout)
        self.machine = PeerSampling(node_id, config, rng or random.Random(), self._admits)
        self._counted: Counter[str] = Counter()
        self._send: Callable[[str, Any], Awaitable[None]] | None = None
        self._nursery: trio.Nursery | None = None
        self._up: set[str] = set()
        self._priority: dict[str, bool] = {}
        self.largest = 0
        """The most links (and link attempts) the transport held at any check."""

    # -- what the transport asks ---------------------------------------------------------------

    def _admits(self, peer: str) -> bool:
        return self.transport is not None and self.transport.peer_public_key(peer) is not None

    def _held(self) -> set[str]:
        """The peers the transport holds a link or a link attempt with (``largest`` records
        the most at any check)."""
        held = set(self.transport.linked_peers())
        self.largest = max(self.largest, len(held))
        return held

    def _room(self, peer: str) -> bool:
        """Whether the transport holds fewer than ``max_peers`` links and attempts besides
        ``peer``'s."""
        if self.transport is None:
            return False
        return len(self._held() - {peer}) < self.max_peers

    def dial(self, peer: str) -> bool:
        return self.machine.wants(peer) and self._room(peer)

    def priority(self, peer: str) -> bool:
        """The ``priority`` our request to ``peer`` carries."""
        return self._priority.get(peer, False)

    def accept(self, peer: str, priority: bool) -> bool:
        """A neighbour request (an offer or an invite from ``peer``): admitted or refused."""
        if self.machine.wants(peer):
            return self._room(peer)
        admitted, actions = self.machine.neighbour_request(peer, priority, trio.current_time())
        self._perform(actions, peer)  # an eviction closes its link now
        if admitted and not self._room(peer):
            # Links the machine no longer holds are still closing: give the slot back.
            self._perform(self.machine.refused(peer, trio.current_time()), peer)
            return False
        return admitted

    def failed(self, peer: str) -> None:
        """Our request to ``peer`` got no link (refused, unreachable, timed out)."""
        self._perform(self.machine.refused(peer, trio.current_time()), peer)

    # -- the side channel ----------------------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        self._up.add(peer)
        self._perform(self.machine.link_up(peer, trio.current_time()), peer)

    def received(self, peer: str, kind: str, body: Any) -> None:
        try:
            message = decode_shuffle(kind, body)
        except MessageError as exc:
            self.drops.count("update", exc.reason, peer)
            return
        self._perform(self.machine.received(peer, message, trio.current_time()), peer)

    def status(self) -> dict[str, Any]:
        """For ``p2pfl status``: the active view (open links), the links being opened, the
        passive view (member id -> age) and who placed its third-party entries, the bound, the
        links the transport holds (now, and the most at any check), and the counts of shuffles
        and link events."""
        return {
            "max_peers": self.max_peers,
            "active": sorted(self.machine.active),
            "reserved": sorted(self.machine.reserved),
            "passive": dict(sorted(self.machine.passive.items())),
            "placed": dict(sorted(self.machine.placed().items())),
            "links": len(self.transport.linked_peers()) if self.transport is not None else 0,
            "largest": self.largest,
            "shuffles": self.machine.shuffles,
            "events": dict(sorted(self.machine.stats.items())),
        }

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, send: Callable[[str, Any], Awaitable[None]]) -> None:
        """Shuffle every period, hand discovery's members in, notice links that went down;
        until cancelled. ``send`` seals and sends a side-channel message (``driver.send_side``)."""
        self._send = send
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._perform(self.machine.start(trio.current_time()))
            next_discovery = trio.current_time()
            while True:
                now = trio.current_time()
                self._notice_down(now)
                if now >= next_discovery:
                    next_discovery = now + DISCOVERY_POLL_S
                    self._perform(self.machine.discovered(self.transport.known_members(), now))
                deadline = self.machine.next_deadline()
                until = now + LINK_POLL_S if deadline is None else deadline
                await trio.sleep_until(min(until, now + LINK_POLL_S))
                self._perform(self.machine.tick(trio.current_time()))

    def _notice_down(self, now: float) -> None:
        """A link that was up and is gone (the peer died, closed it, evicted us): ``link_down``."""
        self._held()
        up = set(self.transport.connected_peers())
        for peer in sorted(self._up - up):
            self._perform(self.machine.link_down(peer, now), peer)
        self._up &= up

    def _perform(self, actions: list[SamplingAction], peer: str | None = None) -> None:
        for action in actions:
            if isinstance(action, SamplingSend):
                if self._nursery is not None and self._send is not None:
                    self._nursery.start_soon(self._send, action.peer, action.message)
            elif isinstance(action, Connect):
                self._priority[action.peer] = action.priority
                if len(self._priority) > 4 * self.max_peers:
                    self._priority = {
                        p: v for p, v in self._priority.items() if self.machine.wants(p)
                    }
                self.transport.wake()
            elif isinstance(action, Disconnect):
                log.info("link closed", extra={"peer": action.peer, "reason": action.reason})
                self.transport.close_peer(action.peer, action.reason)
                self._up.discard(action.peer)
            else:
                log.info("view changed", extra={"added": action.added, "removed": action.removed})
        for reason, total in self.machine.dropped.items():
            fresh = total - self._counted[reason]
            if fresh > 0:
                self.drops.count("update", reason, peer, fresh)
                self._counted[reason] = total
