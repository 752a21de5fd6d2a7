"""Failures with real node processes: SIGKILL and restart, packet loss and delay."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import pytest
import trio

from p2pfl.sim.netns import BridgedNetwork, SharedNetwork, netem_available
from p2pfl.sim.testnode import NodeProcess, node_argv, payload


@pytest.mark.netns
@pytest.mark.slow
async def test_sigkilled_node_is_reported_down_within_10s_and_reconnects_after_restart(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    net = shared_net(3)

    def start(i: int) -> NodeProcess:
        return NodeProcess(net.command(node_argv(i, net.addresses[i])), i)

    nodes = [start(i) for i in range(3)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        victim, survivors = nodes[2], nodes[:2]
        with trio.fail_after(60):
            for node in survivors:
                await node.wait_for(lambda e: e["event"] == "up" and e["peer"] == victim.node_id)
        marks = [len(node.events) for node in survivors]
        victim.kill()
        killed = time.monotonic()
        with trio.fail_after(15):
            for node, mark in zip(survivors, marks, strict=True):
                down = await node.wait_for(
                    lambda e: e["event"] == "down" and e["peer"] == victim.node_id, start=mark
                )
                assert down["reason"] == "heartbeat_timeout"
        assert time.monotonic() - killed < 10
        marks = [len(node.events) for node in survivors]
        restarted = start(2)
        await nursery.start(restarted.run)
        with trio.fail_after(45):
            for node, mark in zip(survivors, marks, strict=True):
                await node.wait_for(
                    lambda e: e["event"] == "up" and e["peer"] == victim.node_id, start=mark
                )
            await restarted.wait_for(lambda e: e["event"] == "up")
        # The reconnected link carries data.
        await survivors[0].command_line(cmd="send", peer=restarted.node_id, size=100_000, seed=3)
        with trio.fail_after(20):
            got = await restarted.wait_for(lambda e: e["event"] == "message")
        assert got["sha256"] == hashlib.sha256(payload(100_000, 3)).hexdigest()
        nursery.cancel_scope.cancel()


async def _transfer_under_impairment(
    sender: NodeProcess, receiver: NodeProcess, sizes: list[int]
) -> None:
    with trio.fail_after(60):
        await sender.wait_for(lambda e: e["event"] == "up")
    for seed, size in enumerate(sizes):
        await sender.command_line(cmd="send", peer=receiver.node_id, size=size, seed=seed)
    with trio.fail_after(150):
        for i in range(len(sizes)):
            await receiver.wait_for(
                lambda e, n=i: (
                    e["event"] == "message"
                    and len([x for x in receiver.events if x["event"] == "message"]) > n
                )
            )
    got = [e for e in receiver.events if e["event"] == "message"]
    # The node process runs each send command as its own task, so compare without order.
    assert sorted(e["sha256"] for e in got) == sorted(
        hashlib.sha256(payload(size, seed)).hexdigest() for seed, size in enumerate(sizes)
    )


SIZES = [1_000_000, 10, 200_000, 1000]


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.skipif(
    not netem_available(), reason="this kernel has no sch_netem (tc netem); see the user-space test"
)
async def test_payloads_arrive_intact_with_netem_loss_and_delay(
    bridged_net: Callable[[int], BridgedNetwork],
) -> None:
    net = bridged_net(2)
    for i in range(2):
        net.impair(i, delay_ms=50, loss_pct=5)
    sender = NodeProcess(net.command(0, node_argv(0, net.addresses[0])), 0)
    receiver = NodeProcess(net.command(1, node_argv(1, net.addresses[1])), 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await nursery.start(receiver.run)
        await _transfer_under_impairment(sender, receiver, SIZES)
        nursery.cancel_scope.cancel()


@pytest.mark.netns
@pytest.mark.slow
async def test_payloads_arrive_intact_with_user_space_loss_and_delay(
    shared_net: Callable[[int], SharedNetwork],
) -> None:
    """5% of each side's datagrams dropped and the rest delayed 50 ms, in the node processes."""
    net = shared_net(2)
    impair = ("--drop-pct", "5", "--delay-ms", "50")
    sender = NodeProcess(net.command(node_argv(0, net.addresses[0], *impair)), 0)
    receiver = NodeProcess(net.command(node_argv(1, net.addresses[1], *impair)), 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await nursery.start(receiver.run)
        await _transfer_under_impairment(sender, receiver, SIZES)
        nursery.cancel_scope.cancel()
