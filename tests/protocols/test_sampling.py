"""The peer-sampling machine: exact actions, bounded views, and hostile shuffles refused."""

from __future__ import annotations

import random

import pytest

from p2pfl.protocols import (
    MessageError,
    PeerSampling,
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


def check_view(m: PeerSampling) -> None:
    assert len(m.view) <= m.config.view_size
    assert m.node_id not in m.view


def test_discovered_members_fill_free_slots_only_up_to_the_view_size() -> None:
    m = machine(view=4)
    actions = m.discovered(["m00", "m01", "m02"], 0.0)
    assert actions == [ViewChange(("m01", "m02"), ())]  # never itself
    actions = m.discovered(MEMBERS[3:], 0.0)
    assert len(m.view) == 4
    assert actions == [ViewChange(tuple(sorted(set(m.view) - {"m01", "m02"})), ())]
    assert m.discovered(MEMBERS, 0.0) == []


def test_members_the_trust_policy_does_not_admit_are_never_taken() -> None:
    m = machine(view=4, members=["m00", "m01"])
    assert m.discovered(["m01", "stranger"], 0.0) == [ViewChange(("m01",), ())]
    assert m.view == {"m01": 0}


def test_a_tick_ages_the_view_and_shuffles_with_the_oldest_entry() -> None:
    m = machine(view=4, period=2.0)
    m.discovered(["m01", "m02", "m03"], 0.0)
    m.start(0.0)
    first = m.next_deadline()
    assert first is not None and 0.0 <= first < 2.0
    (send,) = m.tick(first)
    assert m.next_deadline() == first + 2.0
    assert m.view == {"m01": 1, "m02": 1, "m03": 1}
    m.received("m04", ShuffleRequest((("m04", 0),)), first + 0.5)  # m04 joins younger
    assert m.view["m04"] == 0
    actions = m.tick(first + 2.0)
    assert len(actions) == 1 and isinstance(actions[0], SamplingSend)
    target, request = actions[0].peer, actions[0].message
    # The oldest entry (age 2) that has no request pending; m04 is at age 1.
    assert target in {"m01", "m02", "m03"} - {send.peer}
    assert isinstance(request, ShuffleRequest)
    assert request.entries[0] == ("m00", 0)
    assert len(request.entries) == m.config.length == 2
    sent = request.entries[1]
    assert sent[0] != target and m.view[sent[0]] == sent[1]


def test_a_reply_replaces_what_was_sent_and_drops_the_target() -> None:
    m = machine(view=8, period=1.0)
    m.discovered(MEMBERS[1:9], 0.0)
    m.start(0.0)
    (send,) = m.tick(1.0)
    assert isinstance(send, SamplingSend) and len(send.message.entries) == 3
    sent = send.message.entries[1][0]
    actions = m.received(send.peer, ShuffleReply((("m10", 3), ("m11", 5))), 1.1)
    # Full view: the target's slot takes one entry, the first entry sent the other.
    assert actions == [ViewChange(("m10", "m11"), tuple(sorted((send.peer, sent))))]
    assert m.view["m10"] == 3 and m.view["m11"] == 5
    assert len(m.view) == 8


def test_a_request_gets_a_reply_from_the_view_never_naming_the_requester() -> None:
    m = machine(view=4)
    m.discovered(["m01", "m02", "m03", "m04"], 0.0)
    actions = m.received("m01", ShuffleRequest((("m01", 0), ("m09", 2))), 1.0)
    reply = actions[0]
    assert isinstance(reply, SamplingSend) and reply.peer == "m01"
    assert isinstance(reply.message, ShuffleReply)
    ids = [node for node, _ in reply.message.entries]
    assert len(ids) == 2 and "m01" not in ids and set(ids) <= {"m02", "m03", "m04"}
    # m01 (already there) keeps its entry; m09 replaces one of the entries replied with.
    assert actions[1] == ViewChange(("m09",), (ids[0],))
    check_view(m)


def test_twenty_machines_back_to_back_keep_their_views_bounded() -> None:
    machines = {node: machine(node, view=4, seed=i) for i, node in enumerate(MEMBERS)}
    for i, m in enumerate(machines.values()):
        m.discovered([MEMBERS[(i + 1) % 20], MEMBERS[(i + 2) % 20]], 0.0)  # a ring to start
        m.start(0.0)
    now = 0.0
    for _ in range(200):
        now += 0.25
        for node, m in machines.items():
            queue = [(node, action) for action in m.tick(now)]
            while queue:
                sender, action = queue.pop()
                if isinstance(action, SamplingSend):
                    answer = machines[action.peer].received(sender, action.message, now)
                    queue += [(action.peer, a) for a in answer]
        for m in machines.values():
            check_view(m)
    assert all(len(m.view) == 4 for m in machines.values())
    assert sum(m.shuffles for m in machines.values()) == 20 * 25  # one per 2 s period
    # Mixed: far more than the ring's 2 successors ever appeared, and in-degrees even out.
    indegree = {node: sum(node in m.view for m in machines.values()) for node in MEMBERS}
    assert max(indegree.values()) <= 8 and min(indegree.values()) >= 1
    # Honest shuffles are never refused; an entry past a peer's share is skipped now and then.
    reasons = set().union(*(m.dropped for m in machines.values()))
    assert reasons <= {"shuffle_entry_over_share"}
    # The union of the views (links are both ways) is connected.
    reached, frontier = {"m00"}, ["m00"]
    while frontier:
        node = frontier.pop()
        for other in set(machines[node].view) | {k for k, m in machines.items() if node in m.view}:
            if other not in reached:
                reached.add(other)
                frontier.append(other)
    assert reached == set(MEMBERS)


def full(m: PeerSampling) -> PeerSampling:
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
    m = full(machine(view=4))
    before = m.view
    assert m.received("m05", ShuffleRequest(entries), 1.0) == []
    assert m.view == before
    assert m.dropped == {reason: 1}


def test_a_request_from_a_non_member_is_refused() -> None:
    m = full(machine(view=4))
    assert m.received("evil", ShuffleRequest((("evil", 0),)), 1.0) == []
    assert m.dropped == {"shuffle_sender_not_member": 1}


def test_hostile_replies_are_refused_and_unsolicited_ones_counted() -> None:
    m = full(machine(view=4, period=1.0))
    m.start(0.0)
    (send,) = m.tick(1.0)
    other = next(p for p in MEMBERS[1:5] if p != send.peer)
    assert m.received(other, ShuffleReply((("m09", 0),)), 1.1) == []
    assert m.received(send.peer, ShuffleReply((("m00", 0),)), 1.1) == []
    assert m.dropped == {"shuffle_unsolicited_reply": 1, "shuffle_names_receiver": 1}
    # The refused reply left the request pending: a good one is still taken, once.
    assert m.received(send.peer, ShuffleReply((("m09", 0),)), 1.2) != []
    assert m.received(send.peer, ShuffleReply((("m10", 0),)), 1.3) == []
    assert m.dropped["shuffle_unsolicited_reply"] == 2


def test_flooding_requests_from_one_peer_are_refused_within_the_interval() -> None:
    m = full(machine(view=4, period=2.0))  # min interval 1 s
    assert m.received("m05", ShuffleRequest((("m05", 0),)), 1.0) != []
    for k in range(10):
        assert m.received("m05", ShuffleRequest((("m05", 0), (f"m{10 + k}", 0))), 1.5) == []
    assert m.dropped == {"shuffle_flood": 10}
    assert m.received("m05", ShuffleRequest((("m05", 0),)), 2.0) != []


def test_one_peer_cannot_place_more_than_its_share_of_the_view() -> None:
    # View 8: one peer may place 3 third-party entries (and itself).
    m = machine(view=8, period=2.0)
    m.discovered(MEMBERS[1:9], 0.0)
    now = 0.0
    colluders = MEMBERS[10:20]
    for k in range(10):
        now += 1.0
        offered = tuple((c, 0) for c in colluders[k % 8 : k % 8 + 2])
        m.received("m09", ShuffleRequest((("m09", 0), *offered)), now)
        check_view(m)
    placed = [p for p in m.view if p in colluders]
    assert len(placed) == 3
    assert m.dropped["shuffle_entry_over_share"] > 0
    assert len(m.view) == 8


def test_an_unanswered_request_drops_its_target_at_the_next_tick() -> None:
    m = full(machine(view=4, period=1.0))
    m.discovered(["m05"], 0.0)  # known but not in the full view
    m.start(0.0)
    (send,) = m.tick(1.0)
    actions = m.tick(2.0)
    assert m.dropped == {"shuffle_timeout": 1}
    assert send.peer not in m.view and "m05" in m.view  # refilled from discovery
    assert ViewChange(("m05",), (send.peer,)) in actions


def test_a_lost_member_leaves_the_view_and_a_known_one_takes_its_slot() -> None:
    m = full(machine(view=4))
    m.discovered(["m05"], 0.0)
    assert m.lost("m01", 1.0) == [ViewChange(("m05",), ("m01",))]
    assert m.lost("m02", 1.0) == [ViewChange((), ("m02",))]
    assert len(m.view) == 3


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
