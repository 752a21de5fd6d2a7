"""The start condition: every protocol waits for its start peers, in the driver and the harness.

A server-free node handed ``Start`` before its peers are up expects nobody's model in round 0,
closes it alone and runs ahead; the driver therefore holds ``Start`` back until ``start_peers``
peers are up (or ``start_timeout_s`` passed), for every protocol, and the processes engine asks
for all the other daemons, as the virtual engine hands every node all its links before ``Start``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from p2pfl.daemon.driver import NodeState, ProtocolDriver
from p2pfl.identity import NodeIdentity
from p2pfl.protocols import (
    Adopt,
    PeerDown,
    PeerUp,
    RoundUpdate,
    Send,
    ServerFreeConfig,
    ServerFreeLearner,
    Start,
    Train,
    TrainingDone,
)
from p2pfl.sim import processes
from p2pfl.sim.scenario import parse_scenario


@dataclass(frozen=True)
class _Report:
    samples: int = 10
    loss: float = 0.5


class _FloatOps:
    rules: Collection[str] = ("mean",)

    def validate(self, reference: float, update: float) -> str | None:
        return None

    def aggregate(
        self, rule: str, reference: float, models: Sequence[float], weights: Sequence[float]
    ) -> float:
        return sum(m * w for m, w in zip(models, weights, strict=True)) / sum(weights)


def _server_free(**config: Any) -> ServerFreeLearner[float]:
    return ServerFreeLearner(
        "a",
        0.0,
        _FloatOps(),
        random.Random(0),
        ServerFreeConfig(round_timeout=5.0, aggregation="mean", **config),
    )


def test_server_free_started_before_its_peers_closes_round_zero_alone() -> None:
    # Why the driver must wait: with no peer up at Start, round 0 expects nobody.
    machine = _server_free()
    assert [type(a) for a in machine.handle(Start(), 0.0)] == [Train]
    actions = machine.handle(TrainingDone(1.0, _Report()), 1.0)  # b's link is not up yet
    assert not any(isinstance(a, Send) for a in actions)
    assert any(isinstance(a, Adopt) for a in actions)
    machine.handle(PeerUp("b"), 1.5)
    assert machine.round == 1  # ran ahead of b, which has not even trained yet


def test_server_free_started_after_its_peers_waits_for_their_models() -> None:
    machine = _server_free()
    machine.handle(PeerUp("b"), 0.0)
    machine.handle(Start(), 0.0)
    actions = machine.handle(TrainingDone(1.0, _Report()), 1.0)
    assert [a for a in actions if isinstance(a, Send)] == [Send("b", RoundUpdate(0, 1.0, 10))]
    assert machine.round == 0
    machine.handle(PeerDown("b"), 2.0)  # ...until b is gone (or the round times out)
    assert machine.round == 1


class _Trainer:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def train(self, weights: Any, epochs: float) -> tuple[Any, Any]:
        self.calls.append(trio.current_time())
        await trio.sleep(1000)  # never finishes within these tests
        return weights, _Report()

    async def evaluate(self, weights: Any) -> dict[str, float]:
        return {"accuracy": 0.0}


class _Sink:
    async def send(self, peer: str, data: bytes) -> None:
        pass


async def _drive(
    start_peers: int, script: list[tuple[float, Any]], *, timeout_s: float = 30.0
) -> tuple[_Trainer, ServerFreeLearner[float]]:
    """Run a driver over ``script`` ((time, transport event)); return what it trained when."""
    machine = _server_free()
    trainer = _Trainer()
    send, receive = trio.open_memory_channel[Any](10)
    driver = ProtocolDriver(
        machine,  # type: ignore[arg-type]
        identity=NodeIdentity.generate(),
        sink=_Sink(),
        trainer=trainer,  # type: ignore[arg-type]
        encode_weights=lambda peer, w: b"",
        decode_weights=lambda peer, b: {},
        state=NodeState(),
        verifier=None,  # type: ignore[arg-type]
        start_peers=start_peers,
        start_timeout_s=timeout_s,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.run, receive)
        for at, event in script:
            await trio.sleep_until(at)
            await send.send(event)
        await trio.sleep_until(100.0)
        nursery.cancel_scope.cancel()
    return trainer, machine


@dataclass(frozen=True)
class _TransportPeerDown:  # the transport's event carries a reason
    peer: str
    reason: str = "gone"


# The transport's events are told apart by class name, as the driver does.
_TransportPeerDown.__name__ = "PeerDown"


async def test_driver_starts_server_free_only_once_its_start_peers_are_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trainer, machine = await _drive(2, [(1.0, PeerUp("b")), (3.0, PeerUp("c"))])
    assert trainer.calls == [3.0]  # the first training waited for the second peer
    assert machine.peers == {"b", "c"}


async def test_driver_start_counts_live_peers_only(autojump_clock: trio.testing.MockClock) -> None:
    script = [(1.0, PeerUp("b")), (2.0, _TransportPeerDown("b")), (4.0, PeerUp("c"))]
    trainer, _ = await _drive(2, [*script, (6.0, PeerUp("b"))])
    assert trainer.calls == [6.0]


async def test_driver_starts_after_the_start_timeout_with_fewer_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trainer, machine = await _drive(3, [(1.0, PeerUp("b"))], timeout_s=20.0)
    assert len(trainer.calls) == 1
    assert trainer.calls[0] == pytest.approx(20.0)
    assert machine.peers == {"b"}


async def test_driver_without_start_peers_starts_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trainer, _ = await _drive(0, [(5.0, PeerUp("b"))])
    assert trainer.calls == [0.0]


@pytest.mark.parametrize("protocol", ["gossip", "server-free", "fedavg"])
def test_processes_engine_has_every_protocol_wait_for_all_other_daemons(protocol: str) -> None:
    scenario = parse_scenario(
        {
            "name": "start",
            "task": {"name": "digits", "nodes": 10},
            "stop": {"time": 60.0, "rounds": 3},
            "setup": [{"name": protocol, "protocol": protocol}],
        }
    )
    spec = processes._cluster_spec(scenario, scenario.setups[0])
    assert spec.start_peers == 9
    assert spec.start_timeout_s > 0
