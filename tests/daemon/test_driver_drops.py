"""The driver counts every rejected message once, in the node's DropLog, by stage and peer."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from p2pfl.daemon.driver import NodeState, PeerState, ProtocolDriver, rejected_from
from p2pfl.daemon.drops import DropLog
from p2pfl.daemon.metrics import NodeMetrics
from p2pfl.identity import NodeIdentity
from p2pfl.protocols import MessageReceived, Penalize
from p2pfl.wire import EnvelopeVerifier, seal


class _Machine:
    """Just enough of a Learner: drops what it is handed, as a real machine counts drops."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.model: Any = None
        self.rounds = 0
        self.next_actions: list[Any] = []

    def handle(self, event: Any, now: float) -> list[Any]:
        if isinstance(event, MessageReceived):
            self.dropped["unexpected_round"] += 1
            self.dropped["stale_model"] += 1  # bookkeeping, not a rejection
        actions, self.next_actions = self.next_actions, []
        return actions

    def next_deadline(self) -> float | None:
        return None


def _driver(drops: DropLog, me: NodeIdentity) -> tuple[ProtocolDriver, _Machine, NodeState]:
    machine = _Machine()
    state = NodeState()
    driver = ProtocolDriver(
        machine,  # type: ignore[arg-type]
        identity=me,
        sink=None,  # type: ignore[arg-type]
        trainer=None,  # type: ignore[arg-type]
        encode_weights=lambda peer, sd: b"",
        decode_weights=lambda peer, data: {},
        state=state,
        verifier=EnvelopeVerifier(is_trusted=lambda key: True, own_key=me.public_key),
        drops=drops,
    )
    return driver, machine, state


async def test_a_rejected_message_is_counted_once_by_stage_peer_and_metric() -> None:
    drops, metrics = DropLog(), NodeMetrics()
    drops.add_hook(metrics.count_drop)
    me, sender = NodeIdentity.generate(), NodeIdentity.generate()
    driver, _, state = _driver(drops, me)
    state.peers[sender.node_id] = PeerState(sender.node_id)

    assert await driver._open(sender.node_id, b"\x00not an envelope") is None
    body = {"no": "fields"}
    frame = seal(sender, kind="gossip.model", body=body, seq=1, now=time.time())
    assert await driver._open(sender.node_id, frame) is None

    snapshot = drops.snapshot()
    assert sum(snapshot.values()) == 2
    (envelope_reason,) = [k for k in snapshot if k.startswith("envelope/")]
    assert snapshot["update/malformed_body"] == 1
    assert drops.peer_totals(sender.node_id) == {"envelope": 1, "update": 1}
    assert rejected_from(drops, sender.node_id) == 2
    reason = envelope_reason.split("/")[1]
    rendered = metrics.render().decode().splitlines()
    assert f'p2pfl_dropped_total{{reason="{reason}",stage="envelope"}} 1.0' in rendered
    assert 'p2pfl_dropped_total{reason="malformed_body",stage="update"} 1.0' in rendered


async def test_machine_drops_and_penalties_count_once_against_the_sender() -> None:
    drops = DropLog()
    me, sender = NodeIdentity.generate(), NodeIdentity.generate()
    driver, machine, _ = _driver(drops, me)
    driver._nursery = object()  # type: ignore[assignment]  # Penalize starts no task
    machine.next_actions = [Penalize(sender.node_id, "bad_update")]
    await driver._handle(MessageReceived(sender.node_id, object()))  # type: ignore[arg-type]
    await driver._handle(MessageReceived(sender.node_id, object()))  # type: ignore[arg-type]
    assert drops.snapshot() == {
        "update/penalized_bad_update": 1,
        "update/unexpected_round": 2,
    }
    assert drops.peer_totals(sender.node_id) == {"update": 3}


async def test_a_message_that_makes_the_machine_or_the_decoder_raise_is_a_counted_drop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drops = DropLog()
    me, sender = NodeIdentity.generate(), NodeIdentity.generate()
    driver, machine, _ = _driver(drops, me)

    def explode(event: Any, now: float) -> list[Any]:
        raise OverflowError("an age of 2**1000")

    machine.handle = explode  # type: ignore[method-assign]
    await driver._handle(MessageReceived(sender.node_id, object()))  # type: ignore[arg-type]
    assert drops.snapshot() == {"update/error_OverflowError": 1}

    def broken_decoder(*args: Any) -> Any:
        raise RecursionError("a bug deep inside message decoding")

    monkeypatch.setattr("p2pfl.daemon.driver.decode_message", broken_decoder)
    frame = seal(sender, kind="gossip.model", body={}, seq=1, now=time.time())
    assert await driver._open(sender.node_id, frame) is None
    assert drops.get("update", "error_RecursionError") == 1


async def test_a_model_the_codec_cannot_carry_is_not_sent_and_is_counted() -> None:
    import torch

    from p2pfl.learning.codecs import encode_model
    from p2pfl.protocols import GossipModel

    drops = DropLog()
    driver, _, state = _driver(drops, NodeIdentity.generate())
    driver.encode_weights = lambda peer, sd: encode_model(sd, "fp16")
    too_large = {"w": torch.full((3,), 1e6)}  # past fp16's 65504
    await driver._send("peer", GossipModel(weights=too_large, age=1, samples=10))
    assert drops.snapshot() == {"link/unencodable": 1}
    assert state.bytes_out == 0
