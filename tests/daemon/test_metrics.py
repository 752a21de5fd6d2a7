"""Prometheus endpoint on localhost and structured log lines."""

from __future__ import annotations

import functools
import io
import json
import logging
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import trio

from p2pfl.daemon.drops import DropLog
from p2pfl.daemon.metrics import NodeMetrics, configure_logging, set_log_level


@pytest.fixture(autouse=True)
def _restore_p2pfl_logger() -> Iterator[None]:
    # configure_logging changes process-wide logger state; other tests rely on propagation.
    logger = logging.getLogger("p2pfl")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_metrics_endpoint_serves_node_figures_on_localhost() -> None:
    metrics = NodeMetrics()
    metrics.round.set(7)
    metrics.loss.set(0.25)
    metrics.metric.labels("accuracy").set(0.91)
    metrics.peers.set(2)
    metrics.bytes_received.inc(1000)
    metrics.bytes_sent.inc(2000)
    drops = DropLog()
    drops.add_hook(metrics.count_drop)
    drops.count("envelope", "bad_signature", "peer-a", n=3)
    drops.count("link", "incomplete_timeout", "peer-b")
    metrics.training_seconds.inc(1.5)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(metrics.serve, "127.0.0.1", 0)
        status, body = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{port}/metrics")
        missing, _ = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{port}/")
        nursery.cancel_scope.cancel()
    assert status == 200 and missing == 404
    for line in (
        "p2pfl_round 7.0",
        "p2pfl_loss 0.25",
        'p2pfl_model_metric{name="accuracy"} 0.91',
        "p2pfl_peers 2.0",
        "p2pfl_received_bytes_total 1000.0",
        "p2pfl_sent_bytes_total 2000.0",
        'p2pfl_dropped_total{reason="bad_signature",stage="envelope"} 3.0',
        'p2pfl_dropped_total{reason="incomplete_timeout",stage="link"} 1.0',
        "p2pfl_training_seconds_total 1.5",
    ):
        assert line in body.splitlines(), line


def test_two_nodes_in_one_process_have_separate_metrics() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.round.set(1)
    b.round.set(2)
    assert b"p2pfl_round 1.0" in a.render() and b"p2pfl_round 2.0" in b.render()


def test_logfmt_lines_carry_extra_fields_and_quote_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")  # journald: no timestamps of our own
    out = io.StringIO()
    configure_logging("info", "logfmt", stream=out)
    log = logging.getLogger("p2pfl.daemon.test")
    log.info("peer up", extra={"peer": "abc123", "rtt_ms": 0.51234567, "level": "x"})
    log.debug("hidden")
    set_log_level("debug")
    log.debug('with "quotes"')
    assert out.getvalue().splitlines() == [
        'level=info logger=p2pfl.daemon.test msg="peer up" peer=abc123 rtt_ms=0.512346 level_=x',
        'level=debug logger=p2pfl.daemon.test msg="with \\"quotes\\""',
    ]


def test_json_lines_have_timestamps_outside_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    logging.getLogger("p2pfl.x").warning("slow round", extra={"round": 3})
    record = json.loads(out.getvalue())
    assert record["level"] == "warning" and record["round"] == 3 and record["ts"].endswith("Z")


def test_unknown_log_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        set_log_level("loud")


async def test_a_reset_metrics_connection_is_contained_and_the_endpoint_keeps_serving() -> None:
    metrics, drops = NodeMetrics(), DropLog()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(metrics.serve, drops=drops), "127.0.0.1", 0)
        for _ in range(5):  # reset mid-request
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            await sock.send(b"GET /met")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 200 OK")
        nursery.cancel_scope.cancel()
