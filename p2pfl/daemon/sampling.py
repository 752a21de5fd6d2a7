"""[limits] max_peers in the daemon: a peer-sampling view chooses and refreshes the links.

``SampledLinks`` runs the pure ``p2pfl.protocols.PeerSampling`` machine (the one the virtual
engine runs) against the transport:

- Discovery still learns every member (mDNS adverts and signaling, both signed); those are the
  members the machine admits, so a shuffle naming anyone else is refused whole.
- The transport dials only view members (and members that invited us to dial them: the
  smaller id offers), and accepts a link from a member outside the view only while fewer than
  ``max_peers`` such links are up: a node holds at most ``max_peers`` links it chose and at
  most ``max_peers`` that other members' views chose (Cyclon's views are directed; a shuffle
  travels over the requester's link). Past that, offers are refused (``link/max_peers``) and
  the idle surplus is closed.
- A member that leaves the view keeps its link only as one of the others' (above); surplus
  links are closed once no message to them is in flight. A new view member is dialled.
- Shuffles travel as signed envelopes on the driver's side channel (kinds ``sampling.*``);
  every refusal is counted in the DropLog (stage ``update``, the machine's reason).
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
    MessageError,
    PeerSampling,
    SamplingAction,
    SamplingConfig,
    SamplingSend,
    decode_shuffle,
)

log = logging.getLogger(__name__)

DISCOVERY_POLL_S = 1.0
"""How often the members discovery knows are handed to the machine (and surplus links pruned)."""


class SampledLinks:
    """The daemon's peer sampling: the side channel for shuffles and the transport's policy."""

    def __init__(
        self,
        node_id: str,
        max_peers: int,
        period: float,
        drops: DropLog,
        rng: random.Random | None = None,
    ) -> None:
        self.transport: Any = None
        """The ``PeerTransport`` (set once it exists; it asks this object from the start)."""
        self.drops = drops
        self.max_peers = max_peers
        self.kinds = frozenset(SHUFFLE_KINDS)
        config = SamplingConfig(view_size=max_peers, period=period)
        self.machine = PeerSampling(node_id, config, rng or random.Random(), self._admits)
        self._counted: Counter[str] = Counter()
        self._send: Callable[[str, Any], Awaitable[None]] | None = None
        self._nursery: trio.Nursery | None = None
        self._was_up: set[str] = set()

    # -- what the transport asks ---------------------------------------------------------------

    def _admits(self, peer: str) -> bool:
        return self.transport is not None and self.transport.peer_public_key(peer) is not None

    def dial(self, peer: str) -> bool:
        return peer in self.machine.view

    def accept(self, peer: str) -> bool:
        view = self.machine.view
        if peer in view:
            return True
        return len(self._inbound(view)) < self.max_peers

    def _inbound(self, view: dict[str, int], *, pending: bool = True) -> list[str]:
        if self.transport is None:
            return []
        peers = self.transport.linked_peers() if pending else self.transport.connected_peers()
        return [p for p in peers if p not in view]

    # -- the side channel ----------------------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        pass

    def received(self, peer: str, kind: str, body: Any) -> None:
        try:
            message = decode_shuffle(kind, body)
        except MessageError as exc:
            self.drops.count("update", exc.reason, peer)
            return
        self._perform(self.machine.received(peer, message, trio.current_time()), peer)

    def status(self) -> dict[str, Any]:
        """For ``p2pfl status``: the view (member id -> age), its bound, shuffles started."""
        return {
            "max_peers": self.max_peers,
            "view": dict(sorted(self.machine.view.items())),
            "shuffles": self.machine.shuffles,
        }

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, send: Callable[[str, Any], Awaitable[None]]) -> None:
        """Shuffle every period, hand discovery's members in, prune surplus links; until
        cancelled. ``send`` seals and sends a side-channel message (``driver.send_side``)."""
        self._send = send
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._perform(self.machine.start(trio.current_time()))
            while True:
                now = trio.current_time()
                self._forget_lost(now)
                self._perform(self.machine.discovered(self.transport.known_members(), now))
                self._prune()
                deadline = self.machine.next_deadline()
                until = now + DISCOVERY_POLL_S if deadline is None else deadline
                await trio.sleep_until(min(until, now + DISCOVERY_POLL_S))
                self._perform(self.machine.tick(trio.current_time()))

    def _forget_lost(self, now: float) -> None:
        """A view member whose link was up and is gone (it died, or its link failed) leaves the
        view now, not only when a shuffle with it times out; discovery may offer it again."""
        up = set(self.transport.connected_peers())
        for peer in sorted(self._was_up - up):
            if peer in self.machine.view:
                self._perform(self.machine.lost(peer, now))
        self._was_up = up & self.machine.view.keys()

    def _perform(self, actions: list[SamplingAction], peer: str | None = None) -> None:
        for action in actions:
            if isinstance(action, SamplingSend):
                if self._nursery is not None and self._send is not None:
                    self._nursery.start_soon(self._send, action.peer, action.message)
            else:
                # New members are dialled now; links to members that left are pruned (below).
                log.info("view changed", extra={"added": action.added, "removed": action.removed})
                if action.added:
                    self.transport.wake()
                if action.removed:
                    self._prune()
        for reason, total in self.machine.dropped.items():
            fresh = total - self._counted[reason]
            if fresh > 0:
                self.drops.count("update", reason, peer, fresh)
                self._counted[reason] = total

    def _prune(self) -> None:
        """Close links outside the view beyond ``max_peers`` of them, each once nothing is
        being sent on it (in-flight transfers finish)."""
        if self.transport is None:
            return
        view = self.machine.view
        inbound = self._inbound(view, pending=False)
        for peer in inbound[self.max_peers :]:
            if not self.transport.sending(peer):
                self.transport.close_peer(peer, "over_max_peers")
