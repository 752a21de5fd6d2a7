"""Feature exchange for graph tasks, and message bodies (round trip and hostile input)."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from p2pfl.protocols import (
    MESSAGE_KINDS,
    FeaturePlan,
    FeatureReply,
    FeatureRequest,
    GlobalModel,
    GossipModel,
    Log,
    MessageError,
    MessageReceived,
    Metric,
    PeerUp,
    Penalize,
    RoundUpdate,
    Send,
    ServerFreeLearner,
    SetTimer,
    Start,
    TimerFired,
    Train,
    UseFeatures,
    decode_message,
)


def owned(sensors: tuple[int, ...]) -> bytes | None:
    """This node owns sensors 0..9: four bytes of readings each."""
    return bytes(4 * len(sensors)) if all(s < 10 for s in sensors) else None


def learner(ops: Any, plan: FeaturePlan, peers: tuple[str, ...] = ("b",)) -> Any:
    machine = ServerFreeLearner("a", 1.0, ops, random.Random(0), features=plan)
    for peer in peers:
        machine.handle(PeerUp(peer), 0.0)
    return machine


def test_learning_waits_for_the_halo_features(ops: Any) -> None:
    machine = learner(ops, FeaturePlan(needs={"b": (11, 12)}, timeout=3.0))
    assert machine.handle(Start(), 0.0) == [Send("b", FeatureRequest((11, 12))), SetTimer(3.0)]
    reply = FeatureReply((11, 12), b"\x01" * 8)
    assert machine.handle(MessageReceived("b", reply), 1.0) == [
        UseFeatures("b", (11, 12), b"\x01" * 8),
        Metric("feature_bytes_received", 8),
        Train(1.0, 1.0),
        SetTimer(None),
    ]
    assert machine.bytes_features_received == 8


def test_owner_coming_up_late_is_asked_then(ops: Any) -> None:
    machine = learner(ops, FeaturePlan(needs={"c": (20,)}, timeout=3.0))
    machine.handle(Start(), 0.0)
    assert machine.handle(PeerUp("c"), 1.0) == [Send("c", FeatureRequest((20,)))]


def test_missing_features_start_learning_at_the_timeout(ops: Any) -> None:
    machine = learner(ops, FeaturePlan(needs={"b": (11,)}, timeout=3.0))
    machine.handle(Start(), 0.0)
    assert machine.handle(TimerFired(), 3.0) == [
        Log("starting without features from b", "warning"),
        Train(1.0, 1.0),
        SetTimer(None),
    ]


def test_owner_serves_its_sensors_and_counts_bytes(ops: Any) -> None:
    machine = learner(ops, FeaturePlan(source=owned))
    machine.handle(Start(), 0.0)
    assert machine.handle(MessageReceived("b", FeatureRequest((1, 2, 3))), 1.0) == [
        Send("b", FeatureReply((1, 2, 3), bytes(12))),
        Metric("feature_bytes_sent", 12),
    ]
    assert machine.handle(MessageReceived("b", FeatureRequest((1, 99))), 1.0) == []
    assert machine.bytes_features_sent == 12 and machine.dropped["features_not_owned"] == 1


def test_unrequested_and_wrong_features_are_dropped(ops: Any) -> None:
    machine = learner(ops, FeaturePlan(needs={"b": (11,)}, timeout=3.0), peers=("b", "c"))
    machine.handle(Start(), 0.0)
    assert machine.handle(MessageReceived("c", FeatureReply((11,), b"x")), 1.0) == []
    for _ in range(2):
        assert machine.handle(MessageReceived("b", FeatureReply((12,), b"x")), 1.0) == []
    assert machine.handle(MessageReceived("b", FeatureReply((12,), b"x")), 1.0) == [
        Penalize("b", "features_unknown_sensor")
    ]
    assert machine.dropped["features_not_owner"] == 1


def _refuse_short(sensors: tuple[int, ...], data: bytes) -> str | None:
    return None if len(data) == 4 * len(sensors) else "features_wrong_length"


def test_each_bad_reply_is_dropped_with_its_reason_and_the_owner_stays_pending(ops: Any) -> None:
    plan = FeaturePlan(needs={"b": (11, 12), "c": (13, 14)}, timeout=3.0, check=_refuse_short)
    machine = learner(ops, plan, peers=("b", "c", "d"))
    machine.handle(Start(), 0.0)
    bad = [
        ("d", FeatureReply((11, 12), bytes(8)), "features_not_owner"),  # owns none of the halo
        ("b", FeatureReply((11, 99), bytes(8)), "features_unknown_sensor"),
        ("b", FeatureReply((11, 13), bytes(8)), "features_not_owner"),  # c's sensor
        ("c", FeatureReply((13, 14), bytes(3)), "features_wrong_length"),
        ("c", FeatureReply((13,), bytes(4)), "wrong_features"),  # not all it was asked
    ]  # two strikes each: the third would penalize the peer
    for peer, reply, reason in bad:
        before = machine.dropped[reason]
        actions = machine.handle(MessageReceived(peer, reply), 1.0)
        assert not any(isinstance(a, UseFeatures) for a in actions)
        assert machine.dropped[reason] == before + 1, reason
    good = machine.handle(MessageReceived("b", FeatureReply((11, 12), bytes(8))), 1.5)
    assert UseFeatures("b", (11, 12), bytes(8)) in good
    # A duplicate of an accepted reply is dropped; c stays pending until the deadline.
    assert machine.handle(MessageReceived("b", FeatureReply((11, 12), bytes(8))), 1.6) == []
    assert machine.dropped["unexpected_features"] == 1
    assert machine.handle(TimerFired(), 3.0)[0] == Log(
        "starting without features from c", "warning"
    )


MESSAGES = [
    GossipModel(b"w", 3, 10),
    RoundUpdate(4, b"w", 10),
    GlobalModel(5, b"w"),
    FeatureRequest((1, 2)),
    FeatureReply((1, 2), b"data"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.KIND)
def test_message_survives_msgpack_round_trip(message: Any) -> None:
    body = msgpack.unpackb(msgpack.packb(message.to_body()), raw=False)
    assert decode_message(message.KIND, body) == message


def test_every_kind_is_listed() -> None:
    assert sorted(MESSAGE_KINDS) == sorted(m.KIND for m in MESSAGES)


def test_weights_codec_is_applied_both_ways() -> None:
    message = RoundUpdate(1, [1.0, 2.0], 3)
    body = message.to_body(lambda w: ",".join(map(str, w)).encode())
    assert body["weights"] == b"1.0,2.0"
    decoded = decode_message("round.update", body, lambda b: [float(x) for x in b.split(b",")])
    assert decoded == message


def test_non_bytes_weights_without_codec_is_a_driver_bug() -> None:
    with pytest.raises(TypeError, match="pass encode_weights"):
        RoundUpdate(1, [1.0], 3).to_body()


@pytest.mark.parametrize(
    ("kind", "body", "reason"),
    [
        ("nope", {}, "unknown_kind"),
        ("round.update", [1, 2], "malformed_body"),
        ("round.update", {"round": 1, "samples": 1}, "malformed_body"),
        ("round.update", {"round": True, "weights": b"", "samples": 1}, "malformed_body"),
        ("round.update", {"round": -1, "weights": b"", "samples": 1}, "malformed_body"),
        ("gossip.model", {"age": 1, "weights": "str", "samples": 1}, "malformed_body"),
        ("features.request", {"sensors": [1, "x"]}, "malformed_body"),
        ("features.request", {"sensors": list(range(100_001))}, "malformed_body"),
        ("features.reply", {"sensors": [1], "data": 5}, "malformed_body"),
    ],
)
def test_hostile_bodies_raise_message_error_with_reason(
    kind: str, body: object, reason: str
) -> None:
    with pytest.raises(MessageError) as info:
        decode_message(kind, body)
    assert info.value.reason == reason


def test_failing_weights_decoder_becomes_message_error() -> None:
    def decoder(raw: bytes) -> object:
        raise ValueError("truncated tensor")

    with pytest.raises(MessageError, match="truncated tensor") as info:
        decode_message("fedavg.global", {"round": 1, "weights": b"x"}, decoder)
    assert info.value.reason == "bad_weights"
