"""A test-only build of the daemon whose peer sampling attacks (never part of ``p2pfl run``).

    python tests/daemon/_hostile_sampling.py COLLUDERS_JSON --config p2pfl.toml

Everything is the real daemon (key, certificate, transport, signing, honest gossip learning)
except ``SampledLinks``, replaced before the daemon starts by ``HostileLinks``, an admitted member
that tries to take over its victims' views:

- links: it dials every member it discovers, always claiming high priority (a full victim then
  evicts one of its neighbours), asks again at once when refused, accepts every request, and
  every ``RECONNECT_S`` closes all its links to ask (and evict) again;
- shuffles: every ``BURST_S``, to every linked member, one of: a request naming itself and a
  colluder (far faster than the rate limit), one naming the receiver, one naming a non-member,
  one too large, and an unsolicited reply naming its colluders.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any, ClassVar

import trio

from p2pfl.daemon import sampling
from p2pfl.protocols import ShuffleReply, ShuffleRequest

BURST_S = 0.05
RECONNECT_S = 2.0
STRANGER = "5" * 64  # no member's id


class HostileLinks(sampling.SampledLinks):
    colluders: ClassVar[list[str]] = []

    def dial(self, peer: str) -> bool:
        return self._admits(peer)

    def priority(self, peer: str) -> bool:
        return True

    def accept(self, peer: str, priority: bool) -> bool:
        return True

    def failed(self, peer: str) -> None:
        if self.transport is not None:
            self.transport._retry.pop(peer, None)  # ask again at once

    def peer_up(self, peer: str) -> None:
        pass

    async def run(self, send: Any) -> None:
        me = self.machine.node_id
        forms = itertools.cycle(["flood", "receiver", "stranger", "oversized", "reply"])
        last_reconnect = trio.current_time()
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(BURST_S)
                peers = self.transport.connected_peers()
                pals = [c for c in self.colluders if c != me] or [me]
                for peer in peers:
                    form = next(forms)
                    pal = pals[int(trio.current_time() * 10) % len(pals)]
                    message: Any
                    if form == "flood":
                        message = ShuffleRequest(((me, 0), (pal, 0)))
                    elif form == "receiver":
                        message = ShuffleRequest(((me, 0), (peer, 0)))
                    elif form == "stranger":
                        message = ShuffleRequest(((me, 0), (STRANGER, 0)))
                    elif form == "oversized":
                        message = ShuffleRequest(((me, 0), *((c, 0) for c in pals), (STRANGER, 0)))
                    else:
                        message = ShuffleReply(tuple((c, 0) for c in pals))
                    nursery.start_soon(send, peer, message)
                if trio.current_time() - last_reconnect >= RECONNECT_S:
                    last_reconnect = trio.current_time()
                    for peer in peers:
                        self.transport.close_peer(peer, "hostile")
                        self.transport._retry.pop(peer, None)
                    self.transport.wake()


def main() -> None:
    HostileLinks.colluders = [str(c) for c in json.loads(sys.argv[1])]
    sampling.SampledLinks = HostileLinks  # type: ignore[misc]
    from p2pfl.cli import main as cli

    cli(args=["run", *sys.argv[2:]])


if __name__ == "__main__":
    main()
