"""The peer-sampling machine: exact actions, a symmetric bounded active view, a passive view kept
by shuffles, and hostile input refused and counted."""

from __future__ import annotations

import random

import pytest

from p2pfl.protocols import (
    Connect,
    Disconnect,
    MessageError,
    PeerSampling,
    SamplingAction,
    SamplingConfig,
    SamplingSend,
    ShuffleReply,
    ShuffleRequest,
    ViewChange,
    decode_shuffle,
)

MEMBERS = [f"m{i:02d}" for i in range(20)]


def machine(
    node: str = "m00", view: int = 4, seed: int = 0, members: list[str] | None = None, **kw: float
) -> PeerSampling:
    allowed = set(MEMBERS if members is None else members)
    config = SamplingConfig(view_size=view, **kw)  # type: ignore[arg-type]
    return PeerSampling(node, config, random.Random(seed), allowed.__contains__)


def check(m: PeerSampling) -> None:
    """The invariants after every step."""
    assert len(m.active) + len(m.reserved) <= m.config.view_size
    assert not m.active & m.reserved
    assert len(m.passive) <= m.config.passive
    assert not m.passive.keys() & m.view
    assert m.node_id not in m.view and m.node_id not in m.passive


def linked(m: PeerSampling, peers: list[str], now: float = 0.0) -> PeerSampling:
    """``m`` with open links to ``peers`` (each asked by the peer and admitted)."""
    for peer in peers:
        assert m.neighbour_request(peer, False, now) == (True, [])
        m.link_up(peer, now)
    assert m.active == set(peers)
    return m


class Net:
    """Machines wired back to back: a request is answered at once and the link opens on both
    ends (as the virtual engine does, without latency); closes reach the other end."""

    def __init__(self, nodes: list[str], view: int = 4, **kw: float) -> None:
        self.m = {n: machine(n, view=view, seed=i, **kw) for i, n in enumerate(nodes)}
        self.dead: set[str] = set()

    def run(self, node: str, actions: list[SamplingAction], now: float) -> None:
        queue = [(node, a) for a in actions]
        while queue:
            sender, action = queue.pop(0)
            if sender in self.dead:
                continue
            src = self.m[sender]
            if isinstance(action, Connect):
                if action.peer in self.dead:
                    queue += [(sender, a) for a in src.refused(action.peer, now)]
                    continue
                dst = self.m[action.peer]
                ok, acts = dst.neighbour_request(sender, action.priority, now)
                queue += [(action.peer, a) for a in acts]
                if not ok:
                    queue += [(sender, a) for a in src.refused(action.peer, now)]
                elif not src.wants(action.peer):
                    queue += [(action.peer, a) for a in dst.link_down(sender, now)]
                else:
                    queue += [(sender, a) for a in src.link_up(action.peer, now)]
                    if src.wants(action.peer):
                        queue += [(action.peer, a) for a in dst.link_up(sender, now)]
                        if not dst.wants(sender):
                            queue += [(sender, a) for a in src.link_down(action.peer, now)]
                    else:
                        queue += [(action.peer, a) for a in dst.link_down(sender, now)]
            elif isinstance(action, Disconnect):
                if action.peer not in self.dead:
                    acts = self.m[action.peer].link_down(sender, now)
                    queue += [(action.peer, a) for a in acts]
            elif isinstance(action, SamplingSend) and action.peer not in self.dead:
                acts = self.m[action.peer].received(sender, action.message, now)
                queue += [(action.peer, a) for a in acts]

    def alive(self) -> dict[str, PeerSampling]:
        return {n: m for n, m in self.m.items() if n not in self.dead}

    def symmetric(self) -> None:
        for n, m in self.alive().items():
            check(m)
            for peer in m.active:
                assert n in self.m[peer].active, (n, peer)

    def connected(self) -> bool:
        alive = self.alive()
        start = next(iter(alive))
        reached, frontier = {start}, [start]
        while frontier:
            for other in alive[frontier.pop()].active:
                if other not in reached:
                    reached.add(other)
                    frontier.append(other)
        return reached == set(alive)


# -- the active view: symmetric, bounded ----------------------------------------------------


def test_discovered_members_fill_the_passive_view_and_free_slots_are_asked_for() -> None:
    m = machine(view=2, passive_size=3)
    actions = m.discovered(["m00", "m01", "m02", "m03", "m04", "stranger"], 0.0)
    # Two asked (high priority: no link is open yet), the rest passive; never itself or a stranger.
    assert [type(a) for a in actions] == [Connect, Connect]
    assert all(isinstance(a, Connect) and a.priority for a in actions)
    asked = {a.peer for a in actions if isinstance(a, Connect)}
    assert m.reserved == asked and m.active == set()
    assert set(m.passive) == {"m01", "m02", "m03", "m04"} - asked
    check(m)
    # Nothing more while the slots are reserved.
    assert m.discovered(MEMBERS, 0.0) == []
    assert len(m.passive) == 3
    check(m)


def test_an_opened_link_is_active_and_the_next_request_is_low_priority() -> None:
    m = machine(view=2, passive_size=4, period=1.0)
    m.start(0.0)
    first, second = (a.peer for a in m.discovered(["m01", "m02", "m03"], 0.0))  # type: ignore[union-attr]
    assert m.link_up(first, 0.1) == [ViewChange((first,), ())]
    assert m.active == {first} and m.reserved == {second}
    (third,) = m.passive
    # second refuses: it leaves the passive view; the slot is asked for at the next tick, with
    # low priority (a link is open), not at once (a loop over full nodes).
    assert m.refused(second, 0.2) == []
    assert second not in m.passive and m.stats["join_refused"] == 1
    assert Connect(third, priority=False) in m.tick(1.0)
    assert m.reserved == {third}
    # Discovery does not offer second again within the join timeout.
    assert second not in m.passive
    check(m)


def test_requests_are_admitted_while_there_is_room_and_refused_when_full() -> None:
    m = machine(view=2)
    assert m.neighbour_request("m01", False, 0.0) == (True, [])
    assert m.reserved == {"m01"}  # the slot is held while the link opens
    assert m.neighbour_request("m02", True, 0.0) == (True, [])
    # Full (two reserved): refused, even with priority, since no open link can be evicted.
    assert m.neighbour_request("m03", False, 0.0) == (False, [])
    assert m.neighbour_request("m03", True, 0.0) == (False, [])
    assert m.dropped == {"neighbour_full": 2}
    # A request from a member already linked or reserved (a crossing) is admitted again.
    assert m.neighbour_request("m01", False, 0.0) == (True, [])
    assert m.neighbour_request("m00", False, 0.0) == (False, [])
    assert m.neighbour_request("stranger", True, 0.0) == (False, [])
    assert m.dropped["neighbour_not_member"] == 2
    check(m)


def test_a_link_nobody_reserved_is_closed_when_full_and_counted() -> None:
    m = linked(machine(view=2), ["m01", "m02"])
    assert m.link_up("m03", 1.0) == [Disconnect("m03", "unreserved")]
    assert m.dropped == {"link_unreserved": 1}
    assert m.active == {"m01", "m02"}
    assert machine(view=2).link_up("stranger", 1.0) == [Disconnect("stranger", "unreserved")]


def test_high_priority_evicts_a_random_link_the_requester_cannot_choose() -> None:
    evicted = []
    for requester in ("m05", "m06", "m07"):
        m = linked(machine(view=3, seed=7), ["m01", "m02", "m03"])
        ok, actions = m.neighbour_request(requester, True, 1.0)
        assert ok and len(actions) == 2
        disconnect, change = actions
        assert isinstance(disconnect, Disconnect) and disconnect.reason == "evicted"
        assert change == ViewChange((), (disconnect.peer,))
        assert m.reserved == {requester} and disconnect.peer in m.passive
        assert m.stats["evicted"] == 1
        check(m)
        evicted.append(disconnect.peer)
    # The same draw whoever asks: the victim is the node's own random choice.
    assert len(set(evicted)) == 1
    others = {
        linked(machine(view=3, seed=s), ["m01", "m02", "m03"])
        .neighbour_request("m05", True, 1.0)[1][0]
        .peer  # type: ignore[union-attr]
        for s in range(20)
    }
    assert others == {"m01", "m02", "m03"}


def test_evicting_requests_from_one_peer_are_rate_limited() -> None:
    m = linked(machine(view=2, period=2.0), ["m01", "m02"])  # min interval 1 s
    assert m.neighbour_request("m05", True, 1.0)[0]
    m.link_up("m05", 1.1)
    (ask,) = m.lost("m05", 1.2)[1:]  # it leaves; the slot is asked for
    assert isinstance(ask, Connect) and ask.peer != "m05" and len(m.view) == 2
    # ... and m05 asks again at once, to evict another.
    assert m.neighbour_request("m05", True, 1.5) == (False, [])
    assert m.dropped == {"neighbour_flood": 1}
    assert m.neighbour_request("m05", True, 2.6)[0]
    assert m.stats["evicted"] == 2
    check(m)


def test_a_failed_link_goes_passive_and_a_passive_member_is_promoted() -> None:
    m = linked(machine(view=2, passive_size=4), ["m01", "m02"])
    m.discovered(["m03"], 0.0)
    assert m.passive.keys() == {"m03"}
    assert m.link_down("m01", 1.0) == [ViewChange((), ("m01",)), Connect("m03", priority=False)]
    assert m.passive.keys() == {"m01"} and m.reserved == {"m03"}
    # The last link fails: the request for its slot has high priority.
    actions = m.link_down("m02", 1.1)
    assert actions == [ViewChange((), ("m02",)), Connect(actions[1].peer, priority=True)]  # type: ignore[union-attr]
    check(m)


def test_a_lost_member_leaves_both_views_and_a_stale_reservation_times_out() -> None:
    m = linked(machine(view=1, passive_size=4, period=1.0), ["m01"])
    assert m.discovered(["m02", "m03"], 0.0) == []  # passive: a link is open, the view full
    m.start(0.0)
    (change, ask) = m.lost("m01", 0.5)
    assert change == ViewChange((), ("m01",))
    assert isinstance(ask, Connect) and ask.priority and ask.peer in {"m02", "m03"}
    assert "m01" not in m.passive and m.active == set() and m.reserved == {ask.peer}
    # No answer within the join timeout (4 periods): given up, the other member is asked.
    m.tick(1.0)
    assert m.reserved == {ask.peer}
    actions = m.tick(4.5)
    assert m.stats["join_timeout"] == 1
    other = ({"m02", "m03"} - {ask.peer}).pop()
    assert Connect(other, priority=True) in actions
    check(m)


# -- the passive view: shuffles over links ---------------------------------------------------


def test_a_tick_ages_the_passive_view_and_shuffles_with_a_neighbour() -> None:
    m = linked(machine(view=2, passive_size=4, period=2.0, reply_timeout=10.0), ["m01", "m02"])
    m.discovered(["m03", "m04", "m05"], 0.0)
    m.start(0.0)
    first = m.next_deadline()
    assert first is not None and 0.0 <= first < 2.0
    (send,) = m.tick(first)
    assert m.next_deadline() == first + 2.0
    assert m.passive == {"m03": 1, "m04": 1, "m05": 1}
    assert isinstance(send, SamplingSend) and send.peer in {"m01", "m02"}
    assert isinstance(send.message, ShuffleRequest)
    assert send.message.entries[0] == ("m00", 0) and len(send.message.entries) == m.config.length
    # A pending neighbour is not asked again: the other one is.
    (again,) = m.tick(first + 2.0)
    assert isinstance(again, SamplingSend) and again.peer == ({"m01", "m02"} - {send.peer}).pop()


def test_a_reply_replaces_what_was_sent_in_the_passive_view() -> None:
    m = linked(machine(view=1, passive_size=4, period=1.0, shuffle_length=3), ["m01"])
    m.discovered(["m02", "m03", "m04", "m05"], 0.0)  # the passive view is full
    m.start(0.0)
    (send,) = m.tick(1.0)
    assert isinstance(send, SamplingSend) and send.peer == "m01"
    sent = [p for p, _ in send.message.entries[1:]]
    assert len(sent) == 2 and set(sent) <= m.passive.keys()
    reply = ShuffleReply((("m10", 3), ("m11", 5), ("m12", 1)))
    assert m.received(send.peer, reply, 1.1) == []
    # Full: the two entries sent make room for two received; the third finds none.
    assert m.passive.keys() == {"m02", "m03", "m04", "m05", "m10", "m11"} - set(sent)
    assert m.passive["m10"] == 3 and m.passive["m11"] == 5
    check(m)


def test_a_request_gets_a_reply_from_the_passive_view_never_naming_the_requester() -> None:
    m = linked(machine(view=4, passive_size=4), ["m01"])
    m.discovered(["m02", "m03", "m04", "m05", "m06", "m07", "m08"], 0.0)
    actions = m.received("m01", ShuffleRequest((("m01", 0), ("m09", 2))), 1.0)
    reply = actions[0]
    assert isinstance(reply, SamplingSend) and reply.peer == "m01"
    assert isinstance(reply.message, ShuffleReply)
    ids = [node for node, _ in reply.message.entries]
    assert len(ids) == 2 and "m01" not in ids and set(ids) <= set(m.passive) | {ids[0]}
    # m01 is a neighbour (skipped); m09 replaced the first entry replied with.
    assert "m09" in m.passive and ids[0] not in m.passive
    check(m)


def test_a_shuffle_request_must_come_over_a_link() -> None:
    m = machine(view=4)
    m.discovered(MEMBERS[1:6], 0.0)
    assert m.received("m09", ShuffleRequest((("m09", 0),)), 1.0) == []
    assert m.dropped == {"shuffle_sender_not_neighbour": 1}


# -- many machines ---------------------------------------------------------------------------


def test_twenty_machines_hold_symmetric_bounded_connected_views_and_heal() -> None:
    net = Net(MEMBERS, view=4, period=2.0)
    for i, (node, m) in enumerate(net.m.items()):
        net.run(node, m.discovered([MEMBERS[(i + 1) % 20], MEMBERS[(i + 2) % 20]], 0.0), 0.0)
        m.start(0.0)
    now = 0.0
    for _ in range(200):
        now += 0.25
        for node, m in net.alive().items():
            net.run(node, m.tick(now), now)
        net.symmetric()
    assert all(len(m.active) >= 2 for m in net.m.values())
    assert net.connected()
    assert sum(m.shuffles for m in net.m.values()) >= 20 * 20
    # Shuffles spread the ring's 2 successors to far more members.
    assert all(len(m.passive) >= 6 for m in net.m.values())
    reasons = set().union(*(m.dropped for m in net.m.values()))
    assert reasons <= {"shuffle_entry_over_share", "neighbour_full"}
    # Five die at once; the others lose their links and promote passive members.
    net.dead = set(MEMBERS[::4])
    for node, m in net.alive().items():
        for peer in sorted(m.view & net.dead):
            net.run(node, m.link_down(peer, now), now)
    for _ in range(80):
        now += 0.25
        for node, m in net.alive().items():
            net.run(node, m.tick(now), now)
        net.symmetric()
    assert net.connected()
    assert all(m.active and not m.active & net.dead for m in net.alive().values())


# -- hostile input ---------------------------------------------------------------------------


def neighbour(view: int = 4, **kw: float) -> PeerSampling:
    """m00 linked to m05 (the sender in the hostile tests), m01-m04 passive."""
    m = linked(machine(view=view, **kw), ["m05"])
    m.discovered(["m01", "m02", "m03", "m04"], 0.0)
    for peer in list(m.reserved):
        m.refused(peer, 0.0)
    m.discovered(["m01", "m02", "m03", "m04"], 0.0)
    return m


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ((("m05", 0), ("m06", 0), ("m07", 0)), "shuffle_oversized"),
        ((("m05", 0), ("m05", 1)), "shuffle_duplicate_entries"),
        ((("m05", 0), ("m00", 0)), "shuffle_names_receiver"),
        ((("m05", 0), ("evil", 0)), "shuffle_unknown_member"),
    ],
)
def test_hostile_requests_are_refused_whole_and_counted(
    entries: tuple[tuple[str, int], ...], reason: str
) -> None:
    m = neighbour()
    before = m.passive
    assert m.received("m05", ShuffleRequest(entries), 1.0) == []
    assert m.passive == before
    assert m.dropped == {reason: 1}


def test_a_request_from_a_non_member_is_refused() -> None:
    m = neighbour()
    assert m.received("evil", ShuffleRequest((("evil", 0),)), 1.0) == []
    assert m.dropped == {"shuffle_sender_not_member": 1}


def test_hostile_replies_are_refused_and_unsolicited_ones_counted() -> None:
    m = linked(machine(view=2, period=1.0), ["m01", "m02"])
    m.start(0.0)
    (send,) = m.tick(1.0)
    assert isinstance(send, SamplingSend)
    other = ({"m01", "m02"} - {send.peer}).pop()
    assert m.received(other, ShuffleReply((("m09", 0),)), 1.1) == []
    assert m.received(send.peer, ShuffleReply((("m00", 0),)), 1.1) == []
    assert m.dropped == {"shuffle_unsolicited_reply": 1, "shuffle_names_receiver": 1}
    # The refused reply left the request pending: a good one is still taken, once.
    assert m.received(send.peer, ShuffleReply((("m09", 0),)), 1.2) == []
    assert "m09" in m.passive
    assert m.received(send.peer, ShuffleReply((("m10", 0),)), 1.3) == []
    assert m.dropped["shuffle_unsolicited_reply"] == 2 and "m10" not in m.passive


def test_flooding_requests_from_one_peer_are_refused_within_the_interval() -> None:
    m = neighbour(period=2.0)  # min interval 1 s
    assert m.received("m05", ShuffleRequest((("m05", 0),)), 1.0) != []
    for k in range(10):
        assert m.received("m05", ShuffleRequest((("m05", 0), (f"m{10 + k}", 0))), 1.5) == []
    assert m.dropped == {"shuffle_flood": 10}
    assert m.received("m05", ShuffleRequest((("m05", 0),)), 2.0) != []


def test_one_peer_cannot_place_more_than_its_share_of_the_passive_view() -> None:
    # Passive view 8: one peer may place 3 third-party entries (its own is proven).
    m = linked(machine(view=2, passive_size=8, period=2.0, shuffle_length=2), ["m01", "m09"])
    m.discovered(MEMBERS[2:9], 0.0)
    now = 0.0
    colluders = MEMBERS[10:20]
    for k in range(10):
        now += 1.0
        offered = tuple((c, 0) for c in colluders[k % 8 : k % 8 + 1])
        m.received("m09", ShuffleRequest((("m09", 0), *offered)), now)
        check(m)
    placed = [p for p in m.passive if p in colluders]
    assert len(placed) == 3 and m.placed() == {"m09": 3}
    assert m.dropped["shuffle_entry_over_share"] > 0
    # Nor the active view: it holds one slot itself, whatever it names.
    assert not m.active & set(colluders)


def test_an_unanswered_shuffle_is_given_up_at_the_next_tick() -> None:
    m = linked(machine(view=2, period=1.0), ["m01", "m02"])
    m.start(0.0)
    (send,) = m.tick(1.0)
    assert isinstance(send, SamplingSend)
    m.tick(2.0)
    assert m.dropped == {"shuffle_timeout": 1}
    assert m.active == {"m01", "m02"}  # a link's failure, not a slow shuffle, closes it


def test_time_going_backwards_is_a_driver_bug() -> None:
    m = machine()
    m.start(5.0)
    with pytest.raises(ValueError, match="backwards"):
        m.tick(4.0)


def test_shuffle_bodies_round_trip_and_malformed_ones_raise_message_error() -> None:
    request = ShuffleRequest((("m01", 0), ("m02", 7)))
    assert decode_shuffle(request.KIND, request.to_body()) == request
    reply = ShuffleReply((("m03", 1),))
    assert decode_shuffle(reply.KIND, reply.to_body()) == reply
    bad = [
        {"entries": [["m01", -1]]},
        {"entries": [["m01", True]]},
        {"entries": [["", 0]]},
        {"entries": [["x" * 129, 0]]},
        {"entries": [["m01"]]},
        {"entries": "m01"},
        ["m01", 0],
    ]
    for body in bad:
        with pytest.raises(MessageError) as info:
            decode_shuffle(ShuffleRequest.KIND, body)
        assert info.value.reason == "malformed_body"
    with pytest.raises(MessageError) as info:
        decode_shuffle(ShuffleReply.KIND, {"entries": [[f"m{i}", 0] for i in range(65)]})
    assert info.value.reason == "shuffle_oversized"
