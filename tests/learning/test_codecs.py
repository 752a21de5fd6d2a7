"""``learning.codecs.LinkCodecs``: the one per-link codec the daemon's driver and the virtual
engine run (issue 13, part 5): per-peer state, healing after a loss or a restart, and hostile
deltas as counted drops."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import torch

from p2pfl.daemon.driver import NodeState, ProtocolDriver
from p2pfl.daemon.drops import DropLog
from p2pfl.identity import NodeIdentity
from p2pfl.learning.codecs import LinkCodecs
from p2pfl.protocols import GossipModel
from p2pfl.wire import EnvelopeVerifier, WireError, pack, seal, unpack


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(50, 20, generator=g), "b": torch.randn(20, generator=g)}


def _step(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _kind(data: bytes) -> str:
    return "keyframe" if unpack(data)[2] == 0 else "delta"


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
def test_a_dense_codec_sends_every_model_whole_and_the_same_to_every_peer(codec: str) -> None:
    links = LinkCodecs(codec)
    model = _model(0)
    assert not links.per_link
    assert links.encode("a", model) == links.encode("b", model)
    got = LinkCodecs(codec).decode("x", links.encode("a", model))
    assert _close(got, model) <= (0 if codec == "fp32" else 0.05)


def test_topk_keeps_one_reference_per_peer_and_direction() -> None:
    alice, bob, carol = LinkCodecs("topk"), LinkCodecs("topk"), LinkCodecs("topk")
    model = _model(0)
    # First message on each link: whole (a keyframe), exactly.
    assert _close(bob.decode("alice", alice.encode("bob", model)), model) == 0
    assert _close(carol.decode("alice", alice.encode("carol", model)), model) == 0
    # Alice's model moves; only Bob hears of it, twice: Carol's link is not advanced.
    moved = _step(model, 1)
    to_bob = [alice.encode("bob", moved) for _ in range(2)]
    assert [_kind(d) for d in to_bob] == ["delta", "delta"]
    first, second = (bob.decode("alice", d) for d in to_bob)
    # 1 % a message, the unsent rest next time: the copy comes nearer (error feedback).
    assert _close(second, moved) < _close(first, moved) < _close(model, moved)
    to_carol = alice.encode("carol", moved)
    assert _kind(to_carol) == "delta" and len(to_carol) < 0.05 * len(to_bob[0]) * 50
    assert _close(carol.decode("alice", to_carol), first) == 0  # the same first step as Bob's
    # Bob's copy of Alice is his own: a delta for Carol's link does not fit it.
    with pytest.raises(WireError):
        bob.decode("alice", alice.encode("carol", moved))
    # Bob sending to Alice uses the other direction's state.
    assert _kind(bob.encode("alice", model)) == "keyframe"


def test_a_delta_is_a_small_fraction_of_the_model() -> None:
    sender = LinkCodecs("topk")
    whole = sender.encode("p", _model(0))
    delta = sender.encode("p", _step(_model(0), 1))
    # 1 % of 1,020 values: 11 values + 11 indices (8 bytes each) and the framing.
    assert len(delta) < len(whole) / 10


def test_a_lost_delta_is_a_drop_until_the_next_keyframe_heals_the_link() -> None:
    sender, receiver = LinkCodecs("topk", keyframe_every=4), LinkCodecs("topk")
    model = _model(0)
    receiver.decode("s", sender.encode("s", model))  # keyframe (message 1)
    model = _step(model, 1)
    sender.encode("s", model)  # message 2: lost on the way
    outcomes = []
    for seed in (2, 3, 4):
        model = _step(model, seed)
        try:
            receiver.decode("s", sender.encode("s", model))
            outcomes.append("decoded")
        except WireError as exc:
            outcomes.append(exc.reason)
    assert outcomes == ["bad_tensor", "bad_tensor", "decoded"]  # the 4th message is whole


def test_a_restart_of_either_end_heals_at_the_next_message() -> None:
    sender, receiver = LinkCodecs("topk"), LinkCodecs("topk")
    model = _model(0)
    receiver.decode("s", sender.encode("s", model))
    receiver = LinkCodecs("topk")  # the receiver restarted: it holds nothing of the sender
    model = _step(model, 1)
    with pytest.raises(WireError):
        receiver.decode("s", sender.encode("s", model))
    sender.restart("r")  # the new session (PeerUp) or a failed send: the next model is whole
    sender.restart("s")
    data = sender.encode("s", model)
    assert _kind(data) == "keyframe" and _close(receiver.decode("s", data), model) == 0
    # A restarted sender: a fresh LinkCodecs starts with a keyframe the old receiver takes.
    fresh = LinkCodecs("topk")
    assert _close(receiver.decode("s", fresh.encode("s", model)), model) == 0


def test_hostile_deltas_are_wire_errors_never_a_crash_or_a_changed_reference() -> None:
    sender, receiver = LinkCodecs("topk"), LinkCodecs("topk")
    model = _model(0)
    receiver.decode("s", sender.encode("s", model))
    good = sender.encode("s", _step(model, 1))
    fields = list(unpack(good))
    wrong_base = pack([*fields[:2], fields[2] + 5, fields[3] + 5, *fields[4:]])
    wrong_digest = pack([*fields[:4], b"\x00" * 8, fields[5]])
    # The last index of each sparse tensor pushed far past the tensor's end (uint32 LE).
    payload = unpack(fields[5])
    entries = []
    for name, dtype, shape, encoding, data, extra in payload[3]:
        if encoding == "topk":
            extra = bytes(extra[:-4]) + (10**6).to_bytes(4, "little")
        entries.append([name, dtype, shape, encoding, data, extra])
    oversized = pack([*fields[:5], pack([*payload[:3], entries])])
    hostile = (wrong_base, wrong_digest, oversized, b"\xc1", pack(["p2pfl.state_delta"]))
    reasons = []
    for data in hostile:
        with pytest.raises(WireError) as caught:
            receiver.decode("s", data)
        reasons.append(caught.value.reason)
    assert reasons == ["bad_tensor", "bad_tensor", "bad_tensor", "malformed", "malformed"]
    assert _close(receiver.decode("s", good), sender._out["s"].reference or {}) == 0


class _Machine:
    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.model: Any = None
        self.rounds = 0

    def handle(self, event: Any, now: float) -> list[Any]:
        return []

    def next_deadline(self) -> float | None:
        return None


async def test_the_daemon_counts_an_undecodable_delta_as_a_dropped_message() -> None:
    me, peer = NodeIdentity.generate(), NodeIdentity.generate()
    links, theirs = LinkCodecs("topk"), LinkCodecs("topk")
    drops = DropLog()
    driver = ProtocolDriver(
        _Machine(),  # type: ignore[arg-type]
        identity=me,
        sink=None,  # type: ignore[arg-type]
        trainer=None,  # type: ignore[arg-type]
        encode_weights=links.encode,
        decode_weights=links.decode,
        restart_link=links.restart,
        state=NodeState(),
        verifier=EnvelopeVerifier(is_trusted=lambda key: True, own_key=me.public_key),
        drops=drops,
    )
    seq = iter(range(1, 100))

    def frame(weights: Any) -> bytes:
        body = GossipModel(weights=weights, age=1, samples=10).to_body(
            lambda sd: theirs.encode(me.node_id, sd)
        )
        return seal(peer, kind="gossip.model", body=body, seq=next(seq), now=time.time())

    model = _model(0)
    assert await driver._open(peer.node_id, frame(model)) is not None  # keyframe
    theirs.encode(me.node_id, _step(model, 1))  # a delta that never arrives
    assert await driver._open(peer.node_id, frame(_step(model, 2))) is None
    assert drops.snapshot() == {"update/bad_weights": 1}
    theirs.restart(me.node_id)  # e.g. the link came up again: the next model is whole
    got = await driver._open(peer.node_id, frame(_step(model, 3)))
    assert got is not None and _close(got.weights, _step(model, 3)) == 0
