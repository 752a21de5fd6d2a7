"""Peer sampling with a symmetric active view (HyParView-style, Leitão et al. 2007): a node holds
at most ``view_size`` links, each accepted by both ends, plus a larger *passive view* of members
it could link to, kept fresh by signed Cyclon-style shuffles over the links. A large federation
is then not a full mesh, and a few members cannot fill a node's views (eclipse).

The machine is pure like the learners: methods take ``now`` and return actions; randomness is the
injected ``random.Random``. The driver (``p2pfl.daemon.sampling``, ``p2pfl.sim.virtual``) carries
them out:

- ``Connect(peer, priority)``: ask ``peer`` to become a neighbour (open a link). The answer comes
  back as ``link_up(peer)`` (both ends accepted: the link is open) or ``refused(peer)``.
- ``neighbour_request(peer, priority)`` is the other end: it returns whether the request is
  admitted. Admitting reserves a slot, so the bound holds while the link opens.
- ``Disconnect(peer)``: close the link (an eviction); the other end sees ``link_down``.
- ``SamplingSend(peer, message)``: a shuffle, in a signed envelope, to a neighbour.
- ``ViewChange(added, removed)``: the active view (the open links) changed.

Active view (the links). ``active`` are open links, ``reserved`` are links being opened (asked by
us, or admitted for a peer that asked); ``len(active) + len(reserved) <= view_size`` always, also
transiently. A request is admitted when there is room; when full it is refused (counted
``neighbour_full``) unless it has high priority (the requester has no open link at all): then one
open link, drawn at random by the injected rng (the requester cannot choose whom), is closed
(``Disconnect``, counted in ``stats["evicted"]``) and the requester takes its slot. Whenever there
is room a random passive member is asked (``Connect``; high priority when no link is open): at
once when a link fails or is lost (or members are discovered by a node with no link), else at
the next tick (so a node whose last slot no full node grants asks once a period, not in a
loop). A reservation that is neither opened nor refused within ``join_timeout`` is given up; a
member that refused or timed out is not taken from discovery again for that long.

Passive view. At most ``passive_size`` members (id -> age), disjoint from the active view and never
this node; filled from discovery (``discovered``) and from shuffles. Each period the node ages it by
one and sends a random neighbour a ``ShuffleRequest``: itself (age 0) and up to
``shuffle_length - 1`` other members (drawn from both views). The neighbour replies with as many
entries of its passive view (never the requester), then merges the request; the requester merges
the reply. Merging (Cyclon) skips known entries and fills free slots first, else replaces what
this node sent in the exchange, so the passive view never grows past its size. A member whose
link closes goes back to the passive view; one that refused or timed out leaves it.

Eclipse resistance (each checked by tests/protocols/test_sampling.py):
- Only members ``admits`` (the trust policy and discovery) are named: a shuffle naming anyone
  else is refused whole, a neighbour request from anyone else refused.
- A shuffle larger than ``shuffle_length``, with duplicate ids, or naming this node is refused; a
  shuffle request must come over a link (from an active neighbour).
- One peer may have placed at most ``max_from_peer`` third-party entries in the passive view (its
  own entry is proven by its signature); more are skipped and counted.
- A peer's shuffle requests, and its high-priority neighbour requests that would evict,
  closer together than ``min_request_interval`` are refused (flooding); a reply is taken only
  from the member a request is pending with. An admitted member holds one slot of the active
  view at most, and whom a high-priority request evicts is drawn at random.
- Every refused message or entry is counted in ``dropped`` by reason (the daemon copies them to
  its DropLog); remote input never raises.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, cast

from ._messages import MessageError

MAX_SHUFFLE_ENTRIES = 64
"""No shuffle body may carry more entries than this, whatever the configuration."""
MAX_ID_LENGTH = 128
MAX_ENTRY_AGE = 2**32

Entry: TypeAlias = tuple[str, int]
"""(node id, age in shuffle periods)."""


def _entries(body: object, kind: str) -> tuple[Entry, ...]:
    if not isinstance(body, Mapping):
        raise MessageError("malformed_body", f"{kind} body is {type(body).__name__}, not a map")
    raw = cast(Mapping[str, Any], body).get("entries")
    if not isinstance(raw, list):
        raise MessageError("malformed_body", "field 'entries' is missing or not a list")
    if len(raw) > MAX_SHUFFLE_ENTRIES:
        raise MessageError("shuffle_oversized", f"{len(raw)} entries, limit {MAX_SHUFFLE_ENTRIES}")
    out = []
    for item in raw:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not 0 < len(item[0]) <= MAX_ID_LENGTH
            or not isinstance(item[1], int)
            or isinstance(item[1], bool)
            or not 0 <= item[1] <= MAX_ENTRY_AGE
        ):
            raise MessageError("malformed_body", "an entry is not [node id, age]")
        out.append((item[0], item[1]))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ShuffleRequest:
    """The requester's entries: itself at age 0 and a random part of its view."""

    KIND: ClassVar[str] = "sampling.shuffle"
    entries: tuple[Entry, ...]

    def to_body(self, encode_weights: object = None) -> dict[str, object]:
        return {"sampling": self.KIND, "entries": [[node, age] for node, age in self.entries]}

    @classmethod
    def from_body(cls, body: object) -> ShuffleRequest:
        return cls(_entries(body, cls.KIND))


@dataclass(frozen=True, slots=True)
class ShuffleReply:
    """The answer to a ``ShuffleRequest``: a random part of the replier's view."""

    KIND: ClassVar[str] = "sampling.reply"
    entries: tuple[Entry, ...]

    def to_body(self, encode_weights: object = None) -> dict[str, object]:
        return {"sampling": self.KIND, "entries": [[node, age] for node, age in self.entries]}

    @classmethod
    def from_body(cls, body: object) -> ShuffleReply:
        return cls(_entries(body, cls.KIND))


ShuffleMessage: TypeAlias = ShuffleRequest | ShuffleReply
SHUFFLE_KINDS: tuple[str, ...] = (ShuffleRequest.KIND, ShuffleReply.KIND)


def decode_shuffle(kind: str, body: object) -> ShuffleMessage:
    """The shuffle message of envelope ``kind`` (the body also names it under "sampling"; only the
    signed envelope's kind is read); raises ``MessageError`` if malformed."""
    if kind == ShuffleRequest.KIND:
        return ShuffleRequest.from_body(body)
    if kind == ShuffleReply.KIND:
        return ShuffleReply.from_body(body)
    raise MessageError("unknown_kind", f"not a shuffle kind: {kind!r}")


@dataclass(frozen=True, slots=True)
class SamplingSend:
    """Send ``message`` to ``peer`` (a neighbour) in a signed envelope (kind ``message.KIND``)."""

    peer: str
    message: ShuffleMessage


@dataclass(frozen=True, slots=True)
class Connect:
    """Ask ``peer`` to become a neighbour: open a link (the answer: ``link_up`` or ``refused``).
    ``priority``: this node has no open link (a full receiver then evicts one of its own)."""

    peer: str
    priority: bool


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the link to ``peer`` (``reason``: "evicted"; "unreserved": a link nobody asked for)."""

    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class ViewChange:
    """The active view (the open links) gained ``added`` and lost ``removed`` (sorted)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]


SamplingAction: TypeAlias = SamplingSend | Connect | Disconnect | ViewChange


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    view_size: int
    """The most links (the active view: ``[limits] max_peers``)."""
    period: float = 2.0
    """Seconds between shuffles this node starts."""
    passive_size: int | None = None
    """The most members in the passive view; None: three times ``view_size``."""
    shuffle_length: int | None = None
    """Entries per shuffle message; None: three eighths of ``view_size``, rounded up."""
    max_from_peer: int | None = None
    """Third-party entries one peer may have placed in the passive view; None: three eighths of
    it, rounded up (9 of 24). (Measured on Cyclon views of 8 from a ring start, after 15
    shuffles each: in-degree standard deviation 1.74 with a share of 3, 2.63 with a share of 2,
    1.66 unbounded; smaller shares mix worse.)"""
    min_request_interval: float | None = None
    """Shuffle requests, and evicting neighbour requests, from one peer closer together than
    this are refused; None: half the period."""
    reply_timeout: float | None = None
    """A shuffle request unanswered this long is given up; None: one period."""
    join_timeout: float | None = None
    """A reserved slot whose link neither opens nor is refused this long is given up; None: four
    periods."""

    @property
    def passive(self) -> int:
        return self.passive_size or 3 * self.view_size

    @property
    def length(self) -> int:
        value = self.shuffle_length or max(1, math.ceil(3 * self.view_size / 8))
        return min(value, MAX_SHUFFLE_ENTRIES)

    @property
    def share(self) -> int:
        return self.max_from_peer or max(1, math.ceil(3 * self.passive / 8))

    @property
    def request_interval(self) -> float:
        return self.period / 2 if self.min_request_interval is None else self.min_request_interval

    @property
    def timeout(self) -> float:
        return self.period if self.reply_timeout is None else self.reply_timeout

    @property
    def join(self) -> float:
        return 4 * self.period if self.join_timeout is None else self.join_timeout


class PeerSampling:
    """One node's active and passive views and its shuffles (see the module)."""

    def __init__(
        self,
        node_id: str,
        config: SamplingConfig,
        rng: random.Random,
        admits: Callable[[str], bool],
    ) -> None:
        if config.view_size < 1:
            raise ValueError(f"view_size must be at least 1, got {config.view_size}")
        if not 0 < config.period < math.inf:
            raise ValueError(f"period must be positive, got {config.period}")
        self.node_id, self.config = node_id, config
        self._rng, self._admits = rng, admits
        self._active: set[str] = set()
        """Open links."""
        self._reserved: dict[str, float] = {}
        """Links being opened, and since when."""
        self._asked: set[str] = set()
        """The reserved links this node asked for (the others: requests it admitted)."""
        self._passive: dict[str, int] = {}
        self._source: dict[str, str] = {}
        """Who placed each passive entry (the entry itself when it came from that member)."""
        self._known: set[str] = set()
        """Members discovery reported and did not lose: what fills the passive view."""
        self._pending: dict[str, tuple[tuple[str, ...], float]] = {}
        """Per neighbour a shuffle request went to: the passive ids sent, and when."""
        self._last_request: dict[str, float] = {}
        self._last_neighbour: dict[str, float] = {}
        self._failed: dict[str, float] = {}
        """Members that refused or did not answer, and when: discovery does not offer them
        again for ``join_timeout``."""
        self._next_tick: float | None = None
        self._now = -math.inf
        self.dropped: Counter[str] = Counter()
        """Refused remote input, by reason."""
        self.stats: Counter[str] = Counter()
        """This node's own events: "evicted", "asked", "join_refused", "join_timeout"."""
        self.shuffles = 0

    # -- reading ---------------------------------------------------------------------------

    @property
    def active(self) -> frozenset[str]:
        """The open links."""
        return frozenset(self._active)

    @property
    def reserved(self) -> frozenset[str]:
        """The links being opened (they count against the bound)."""
        return frozenset(self._reserved)

    @property
    def passive(self) -> dict[str, int]:
        """A copy of the passive view: member id -> age."""
        return dict(self._passive)

    @property
    def view(self) -> frozenset[str]:
        """What the links may be: the active view and its reserved slots."""
        return frozenset(self._active | self._reserved.keys())

    def placed(self) -> dict[str, int]:
        """Per peer, the third-party entries it placed in the passive view (at most
        ``config.share`` each)."""
        return dict(Counter(s for p, s in self._source.items() if s != p))

    def wants(self, peer: str) -> bool:
        """Whether a link to ``peer`` is open or being opened (what a transport may dial)."""
        return peer in self._active or peer in self._reserved

    def next_deadline(self) -> float | None:
        return self._next_tick

    # -- events ----------------------------------------------------------------------------

    def start(self, now: float) -> list[SamplingAction]:
        """Begin shuffling; the first shuffle falls anywhere in the first period."""
        self._clock(now)
        self._next_tick = now + self.config.period * self._rng.random()
        return []

    def discovered(self, peers: Iterable[str], now: float) -> list[SamplingAction]:
        """Discovery knows ``peers`` (admitted, reachable): candidates for the passive view,
        drawn at random (so nodes that learn the same members in the same order still differ).
        A node with no link open or being opened asks at once; others at their next tick."""
        self._clock(now)
        self._known.update(p for p in peers if p != self.node_id and self._admits(p))
        self._fill()
        return [] if self._active or self._reserved else self._promote()

    def lost(self, peer: str, now: float) -> list[SamplingAction]:
        """``peer`` is gone (left discovery, revoked, its node died): out of both views."""
        self._clock(now)
        self._known.discard(peer)
        self._pending.pop(peer, None)
        before = set(self._active)
        self._unlink(peer)
        self._forget(peer)
        self._fill()
        return self._changed(before) + self._promote()

    def neighbour_request(
        self, peer: str, priority: bool, now: float
    ) -> tuple[bool, list[SamplingAction]]:
        """``peer`` asks to become a neighbour (a link offer); whether it is admitted. Admitted
        when there is room, or (``priority``) by evicting a random neighbour; else refused."""
        self._clock(now)
        if peer == self.node_id or not self._admits(peer):
            return False, self._drop("neighbour_not_member")
        if peer in self._active or peer in self._reserved:
            return True, []  # a crossing request, or the same link again
        actions: list[SamplingAction] = []
        if len(self._active) + len(self._reserved) >= self.config.view_size:
            if not priority or not self._active:
                return False, self._drop("neighbour_full")
            # Evictions are rate limited per requester (refusing costs nothing; evicting does).
            last = self._last_neighbour.get(peer)
            interval = self.config.request_interval
            self._last_neighbour = {
                p: at for p, at in self._last_neighbour.items() if now - at < interval
            }
            self._last_neighbour[peer] = now
            if last is not None and now - last < interval:
                return False, self._drop("neighbour_flood")
            before = set(self._active)
            evicted = self._rng.choice(sorted(self._active))
            self._unlink(evicted)
            self._to_passive(evicted)
            self.stats["evicted"] += 1
            actions = [Disconnect(evicted, "evicted"), *self._changed(before)]
        self._forget(peer)
        self._reserved[peer] = now
        return True, actions

    def link_up(self, peer: str, now: float) -> list[SamplingAction]:
        """The link to ``peer`` is open (both ends accepted). One nobody reserved is kept only
        while there is room (and ``peer`` is a member), else closed."""
        self._clock(now)
        if peer in self._active:
            return []
        before = set(self._active)
        if peer not in self._reserved:
            full = len(self._active) + len(self._reserved) >= self.config.view_size
            if full or peer == self.node_id or not self._admits(peer):
                self.dropped["link_unreserved"] += 1
                return [Disconnect(peer, "unreserved")]
        self._reserved.pop(peer, None)
        self._asked.discard(peer)
        self._forget(peer)
        self._active.add(peer)
        return self._changed(before)

    def link_down(self, peer: str, now: float) -> list[SamplingAction]:
        """The link to ``peer`` closed or failed (it may have evicted us): back to the passive
        view, and a passive member is asked in its place."""
        self._clock(now)
        if peer not in self._active and peer not in self._reserved:
            return []
        before = set(self._active)
        self._unlink(peer)
        self._pending.pop(peer, None)
        self._to_passive(peer)
        return self._changed(before) + self._promote()

    def refused(self, peer: str, now: float) -> list[SamplingAction]:
        """``peer`` refused to become a neighbour, or could not be reached: it leaves the passive
        view too (discovery or a shuffle may offer it again); another is asked at the next tick."""
        self._clock(now)
        if peer not in self._reserved or peer in self._active:
            return []
        self.stats["join_refused"] += 1
        self._unlink(peer)
        self._forget(peer)
        self._failed[peer] = now
        return []  # the slot is asked for again at the next tick (not in a loop over full nodes)

    def tick(self, now: float) -> list[SamplingAction]:
        """The timer: give up stale reservations and requests, age the passive view, start one
        shuffle with a random neighbour, ask for free slots."""
        self._clock(now)
        if self._next_tick is None or now < self._next_tick:
            return []
        self._next_tick = now + self.config.period
        for peer, at in sorted(self._reserved.items()):
            if now - at >= self.config.join:
                self.stats["join_timeout"] += 1
                asked = peer in self._asked
                self._unlink(peer)
                if asked:
                    self._forget(peer)
                    self._failed[peer] = now
        self._failed = {p: at for p, at in self._failed.items() if now - at < self.config.join}
        for peer, (_, at) in sorted(self._pending.items()):
            if now - at >= self.config.timeout:
                del self._pending[peer]
                self.dropped["shuffle_timeout"] += 1
        self._fill()
        for peer in self._passive:
            self._passive[peer] = min(self._passive[peer] + 1, MAX_ENTRY_AGE)
        actions: list[SamplingAction] = []
        candidates = sorted(self._active - self._pending.keys())
        if candidates:
            target = self._rng.choice(candidates)
            others = sorted((self._active | self._passive.keys()) - {target})
            sent = self._rng.sample(others, min(self.config.length - 1, len(others)))
            self._pending[target] = (tuple(p for p in sent if p in self._passive), now)
            entries = ((self.node_id, 0), *((p, self._passive.get(p, 0)) for p in sent))
            actions.append(SamplingSend(target, ShuffleRequest(entries)))
            self.shuffles += 1
        return actions + self._promote()

    def received(self, peer: str, message: ShuffleMessage, now: float) -> list[SamplingAction]:
        """A verified shuffle message from ``peer`` (the caller checked the envelope)."""
        self._clock(now)
        if isinstance(message, ShuffleReply):
            return self._on_reply(peer, message)
        return self._on_request(peer, message, now)

    # -- shuffles --------------------------------------------------------------------------

    def _on_request(self, peer: str, message: ShuffleRequest, now: float) -> list[SamplingAction]:
        if peer == self.node_id or not self._admits(peer):
            return self._drop("shuffle_sender_not_member")
        if peer not in self._active:
            return self._drop("shuffle_sender_not_neighbour")
        self._last_request = {
            p: at for p, at in self._last_request.items() if now - at < self.config.request_interval
        }
        if peer in self._last_request:
            return self._drop("shuffle_flood")
        reason = self._check(message.entries)
        if reason is not None:
            return self._drop(reason)
        self._last_request[peer] = now
        others = sorted(p for p in self._passive if p != peer)
        sent = self._rng.sample(others, min(len(message.entries), self.config.length, len(others)))
        reply = ShuffleReply(tuple((p, self._passive[p]) for p in sent))
        self._merge(peer, message.entries, sent)
        return [SamplingSend(peer, reply)]

    def _on_reply(self, peer: str, message: ShuffleReply) -> list[SamplingAction]:
        if peer not in self._pending:
            return self._drop("shuffle_unsolicited_reply")
        reason = self._check(message.entries)
        if reason is not None:
            return self._drop(reason)
        sent, _ = self._pending.pop(peer)
        self._merge(peer, message.entries, list(sent))
        return []

    def _check(self, entries: tuple[Entry, ...]) -> str | None:
        """Why a shuffle's entries are refused as a whole, or None."""
        if len(entries) > self.config.length:
            return "shuffle_oversized"
        ids = [node for node, _ in entries]
        if len(set(ids)) != len(ids):
            return "shuffle_duplicate_entries"
        if self.node_id in ids:
            return "shuffle_names_receiver"
        if not all(self._admits(node) for node in ids):
            return "shuffle_unknown_member"
        return None

    def _merge(self, source: str, entries: Iterable[Entry], sent: list[str]) -> None:
        replaceable = [p for p in sent if p in self._passive]
        placed = sum(1 for p, s in self._source.items() if s == source and p != source)
        for node, age in entries:
            if node in self._passive or node in self._active or node in self._reserved:
                continue
            if node != source and placed >= self.config.share:
                self.dropped["shuffle_entry_over_share"] += 1
                continue
            if len(self._passive) >= self.config.passive:
                if not replaceable:
                    break
                self._forget(replaceable.pop(0))
            self._passive[node] = age
            self._source[node] = source
            placed += node != source

    # -- helpers ---------------------------------------------------------------------------

    def _fill(self) -> None:
        """Known members fill free passive slots."""
        free = self.config.passive - len(self._passive)
        if free <= 0:
            return
        spare = sorted(
            self._known
            - self._passive.keys()
            - self._active
            - self._reserved.keys()
            - set(self._failed)
        )
        for peer in self._rng.sample(spare, min(free, len(spare))):
            self._passive[peer] = 0
            self._source[peer] = peer

    def _promote(self) -> list[SamplingAction]:
        """Ask random passive members for every free link slot."""
        actions: list[SamplingAction] = []
        while len(self._active) + len(self._reserved) < self.config.view_size:
            if not self._passive:
                self._fill()
                if not self._passive:
                    break
            peer = self._rng.choice(sorted(self._passive))
            self._forget(peer)
            self._reserved[peer] = self._now
            self._asked.add(peer)
            self.stats["asked"] += 1
            actions.append(Connect(peer, priority=not self._active))
        self._fill()
        return actions

    def _to_passive(self, peer: str) -> None:
        if peer not in self._passive and len(self._passive) < self.config.passive:
            self._passive[peer] = 0
            self._source[peer] = peer

    def _unlink(self, peer: str) -> None:
        self._active.discard(peer)
        self._reserved.pop(peer, None)
        self._asked.discard(peer)

    def _forget(self, peer: str) -> None:
        self._passive.pop(peer, None)
        self._source.pop(peer, None)

    def _changed(self, before: set[str]) -> list[SamplingAction]:
        added = tuple(sorted(self._active - before))
        removed = tuple(sorted(before - self._active))
        return [ViewChange(added, removed)] if added or removed else []

    def _drop(self, reason: str) -> list[SamplingAction]:
        self.dropped[reason] += 1
        return []

    def _clock(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now
