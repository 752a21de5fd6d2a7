"""Peer sampling (Cyclon-style): a partial view of at most ``view_size`` members, kept fresh by
signed shuffles, so that a large federation is not a full mesh and a few members cannot fill a
node's view (eclipse).

The machine is pure like the learners: methods take ``now`` and return actions; randomness is the
injected ``random.Random``; the driver sends ``SamplingSend`` messages in signed envelopes and
keeps one link per view member (``ViewChange`` says which to open and close).

Each period the node ages every entry by one, picks the oldest entry ``q`` and sends it a
``ShuffleRequest``: itself (age 0) and up to ``shuffle_length - 1`` other entries drawn at random.
``q`` replies with up to as many entries of its own view (never the requester), then merges the
request; the requester merges the reply and drops ``q`` from its view (Cyclon's edge reversal:
``q`` now holds the requester). A request that gets no reply by the next tick after
``reply_timeout`` drops ``q`` (a dead member leaves the view). Members that discovery reports
(``discovered``) fill free slots, so the view is never empty while anyone is known.

Invariants (each checked by tests/protocols/test_sampling.py):
- ``len(view) <= view_size``; never this node; no duplicates (the view is a map id -> age).
- Merging (Cyclon): entries already in the view and this node are skipped; a received entry
  fills a free slot first, else replaces one of the entries this node sent in the same exchange,
  so the view never grows past its size and only what was offered is given up.
- Eclipse resistance. Every id a shuffle carries must be admitted by ``admits`` (the caller's
  member list: trust policy and discovery), else the whole message is refused. A message larger
  than ``shuffle_length``, with duplicate ids, or naming this node is refused (honest senders
  never send these: a node is never in its own view and excludes the receiver). One peer may
  have placed at most ``max_from_peer`` third-party entries in the view (its own entry is proven
  by its signature); more are skipped and counted. A peer's requests faster than
  ``min_request_interval`` are refused (flooding), and a reply is taken only from the member a
  request is pending with.
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
    """Send ``message`` to ``peer`` in a signed envelope (kind ``message.KIND``)."""

    peer: str
    message: ShuffleMessage


@dataclass(frozen=True, slots=True)
class ViewChange:
    """The view gained ``added`` and lost ``removed`` (sorted): open and close links."""

    added: tuple[str, ...]
    removed: tuple[str, ...]


SamplingAction: TypeAlias = SamplingSend | ViewChange


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    view_size: int
    """The most members in the view (``[limits] max_peers``)."""
    period: float = 2.0
    """Seconds between shuffles this node starts."""
    shuffle_length: int | None = None
    """Entries per shuffle message; None: ``max_from_peer``'s default."""
    max_from_peer: int | None = None
    """Third-party entries one peer may have placed in the view; None: three eighths of the
    view, rounded up (3 of 8, 2 of 4). Smaller shares mix the views worse: 1,000 machines with
    views of 8 from a ring start, after 15 shuffles each, had in-degrees with a standard
    deviation of 1.74 with a share and length of 3, 2.63 with a share of 2, 1.66 unbounded."""
    min_request_interval: float | None = None
    """Requests from one peer closer together than this are refused; None: half the period."""
    reply_timeout: float | None = None
    """A request unanswered this long drops its target from the view; None: one period."""

    @property
    def length(self) -> int:
        value = self.shuffle_length or max(1, math.ceil(3 * self.view_size / 8))
        return min(value, MAX_SHUFFLE_ENTRIES)

    @property
    def share(self) -> int:
        return self.max_from_peer or max(1, math.ceil(3 * self.view_size / 8))

    @property
    def request_interval(self) -> float:
        return self.period / 2 if self.min_request_interval is None else self.min_request_interval

    @property
    def timeout(self) -> float:
        return self.period if self.reply_timeout is None else self.reply_timeout


class PeerSampling:
    """One node's partial view and its shuffles (see the module for the invariants)."""

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
        self._view: dict[str, int] = {}
        self._source: dict[str, str] = {}
        """Who placed each entry (the entry itself when it came from that member)."""
        self._known: set[str] = set()
        """Members discovery reported and did not lose: what fills free slots."""
        self._pending: dict[str, tuple[tuple[str, ...], float]] = {}
        """Per member a request went to: the ids sent, and when."""
        self._last_request: dict[str, float] = {}
        self._next_tick: float | None = None
        self._now = -math.inf
        self.dropped: Counter[str] = Counter()
        self.shuffles = 0

    # -- reading ---------------------------------------------------------------------------

    @property
    def view(self) -> dict[str, int]:
        """A copy of the view: member id -> age."""
        return dict(self._view)

    def next_deadline(self) -> float | None:
        return self._next_tick

    # -- events ----------------------------------------------------------------------------

    def start(self, now: float) -> list[SamplingAction]:
        """Begin shuffling; the first shuffle falls anywhere in the first period."""
        self._clock(now)
        self._next_tick = now + self.config.period * self._rng.random()
        return []

    def discovered(self, peers: Iterable[str], now: float) -> list[SamplingAction]:
        """Discovery knows ``peers`` (admitted, reachable): candidates for free slots, drawn at
        random (so nodes that learn the same members in the same order still differ)."""
        self._clock(now)
        before = set(self._view)
        self._known.update(p for p in peers if p != self.node_id and self._admits(p))
        self._fill()
        return self._changed(before)

    def lost(self, peer: str, now: float) -> list[SamplingAction]:
        """``peer`` is gone (link down, left discovery, revoked): out of the view."""
        self._clock(now)
        before = set(self._view)
        self._known.discard(peer)
        self._pending.pop(peer, None)
        self._remove(peer)
        self._fill()
        return self._changed(before)

    def tick(self, now: float) -> list[SamplingAction]:
        """The timer: expire unanswered requests, age the view, start one shuffle."""
        self._clock(now)
        if self._next_tick is None or now < self._next_tick:
            return []
        self._next_tick = now + self.config.period
        before = set(self._view)
        for peer, (_, at) in sorted(self._pending.items()):
            if now - at >= self.config.timeout:
                del self._pending[peer]
                self.dropped["shuffle_timeout"] += 1
                self._remove(peer)
        self._fill()
        for peer in self._view:
            self._view[peer] = min(self._view[peer] + 1, MAX_ENTRY_AGE)
        actions: list[SamplingAction] = []
        candidates = [p for p in self._view if p not in self._pending]
        if candidates:
            oldest = max(self._view[p] for p in candidates)
            target = self._rng.choice(sorted(p for p in candidates if self._view[p] == oldest))
            others = sorted(p for p in self._view if p != target)
            sent = self._rng.sample(others, min(self.config.length - 1, len(others)))
            self._pending[target] = (tuple(sent), now)
            entries = ((self.node_id, 0), *((p, self._view[p]) for p in sent))
            actions.append(SamplingSend(target, ShuffleRequest(entries)))
            self.shuffles += 1
        return actions + self._changed(before)

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
        self._last_request = {
            p: at for p, at in self._last_request.items() if now - at < self.config.request_interval
        }
        if peer in self._last_request:
            return self._drop("shuffle_flood")
        reason = self._check(message.entries)
        if reason is not None:
            return self._drop(reason)
        self._last_request[peer] = now
        before = set(self._view)
        others = sorted(p for p in self._view if p != peer)
        sent = self._rng.sample(others, min(len(message.entries), self.config.length, len(others)))
        reply = ShuffleReply(tuple((p, self._view[p]) for p in sent))
        self._merge(peer, message.entries, sent)
        return [SamplingSend(peer, reply), *self._changed(before)]

    def _on_reply(self, peer: str, message: ShuffleReply) -> list[SamplingAction]:
        if peer not in self._pending:
            return self._drop("shuffle_unsolicited_reply")
        reason = self._check(message.entries)
        if reason is not None:
            return self._drop(reason)
        sent, _ = self._pending.pop(peer)
        before = set(self._view)
        self._remove(peer)
        self._merge(peer, message.entries, list(sent))
        return self._changed(before)

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
        replaceable = [p for p in sent if p in self._view]
        placed = sum(1 for p, s in self._source.items() if s == source and p != source)
        for node, age in entries:
            if node in self._view:
                continue
            if node != source and placed >= self.config.share:
                self.dropped["shuffle_entry_over_share"] += 1
                continue
            if len(self._view) >= self.config.view_size:
                if not replaceable:
                    break
                self._remove(replaceable.pop(0))
            self._view[node] = age
            self._source[node] = source
            placed += node != source

    # -- helpers ---------------------------------------------------------------------------

    def _fill(self) -> None:
        free = self.config.view_size - len(self._view)
        if free <= 0:
            return
        spare = sorted(self._known - self._view.keys())
        for peer in self._rng.sample(spare, min(free, len(spare))):
            self._view[peer] = 0
            self._source[peer] = peer

    def _remove(self, peer: str) -> None:
        self._view.pop(peer, None)
        self._source.pop(peer, None)

    def _changed(self, before: set[str]) -> list[SamplingAction]:
        added = tuple(sorted(self._view.keys() - before))
        removed = tuple(sorted(before - self._view.keys()))
        return [ViewChange(added, removed)] if added or removed else []

    def _drop(self, reason: str) -> list[SamplingAction]:
        self.dropped[reason] += 1
        return []

    def _clock(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now
