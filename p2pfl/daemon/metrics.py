"""Observability: Prometheus metrics (optional endpoint) and structured log lines on stderr.

Metrics live in a registry of their own (never prometheus-client's global one, so several nodes in
one process, as in tests, do not collide) and are served by a tiny trio HTTP responder inside the
node's nursery rather than prometheus-client's own server thread: it stops with the node and binds
127.0.0.1 unless configured otherwise.

Logs are one line per event on stderr, ``logfmt`` (``key=value``) or JSON; journald adds its own
timestamps, so lines carry none when ``$JOURNAL_STREAM`` says stderr goes to the journal. Extra
fields come from ``extra={...}``: ``log.info("peer up", extra={"peer": peer_id})``.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from p2pfl.daemon.drops import DropLog, contained

if TYPE_CHECKING:
    import trio

_MAX_REQUEST_HEAD = 8192
_REQUEST_TIMEOUT_S = 5.0


class NodeMetrics:
    """The metrics of one node. Update them from the driver; read them with :meth:`render`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Info("p2pfl_node", "This node: id, name, protocol, task, version", registry=r)
        self.round = Gauge("p2pfl_round", "Current round (protocol's count)", registry=r)
        self.training_steps = Counter(
            "p2pfl_training_steps", "Local training steps finished", registry=r
        )
        self.loss = Gauge("p2pfl_loss", "Loss of the last local training step", registry=r)
        self.metric = Gauge(
            "p2pfl_model_metric", "Last evaluation of the model", ["name"], registry=r
        )
        self.peers = Gauge("p2pfl_peers", "Peers connected now", registry=r)
        self.bytes_received = Counter(
            "p2pfl_received_bytes", "Bytes received from peers", registry=r
        )
        self.bytes_sent = Counter("p2pfl_sent_bytes", "Bytes sent to peers", registry=r)
        self.dropped = Counter(
            "p2pfl_dropped",
            "Everything refused or dropped (connections, frames, messages, updates), by the "
            "stage that dropped it and why",
            ["stage", "reason"],
            registry=r,
        )
        self.training_seconds = Counter(
            "p2pfl_training_seconds", "Wall time spent training", registry=r
        )
        self.samples = Counter("p2pfl_trained_samples", "Samples trained on", registry=r)
        self.forecast_mae = Gauge(
            "p2pfl_forecast_mae_mph",
            "Live operation: rolling MAE of this cloudlet's forecasts, by horizon (minutes)",
            ["horizon"],
            registry=r,
        )
        self.halo_age = Gauge(
            "p2pfl_halo_age_seconds",
            "Live operation: age of the newest halo reading pushed by each owner",
            ["owner"],
            registry=r,
        )
        self.energy = Counter(
            "p2pfl_energy_joules", "Energy of training where the device reports it", registry=r
        )

    def count_drop(self, stage: str, reason: str, n: int) -> None:
        """A :class:`p2pfl.daemon.drops.DropLog` hook: ``drops.add_hook(metrics.count_drop)``."""
        self.dropped.labels(stage, reason).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        drops: DropLog | None = None,
        task_status: trio.TaskStatus[int] | None = None,
    ) -> None:
        """Serve ``GET /metrics`` until cancelled; ``task_status.started(port)`` when bound.

        Each connection is a contained scope (stage ``endpoint``): nothing a client does ends
        the endpoint or the node.
        """
        import trio

        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        handler = functools.partial(contained, drops or DropLog(), "endpoint", None, self._respond)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            if task_status is not None:
                task_status.started(bound)

    async def _respond(self, stream: trio.SocketStream) -> None:
        import trio

        async with stream:
            with trio.move_on_after(_REQUEST_TIMEOUT_S):
                head = bytearray()
                while b"\r\n\r\n" not in head and b"\n\n" not in head:
                    if len(head) > _MAX_REQUEST_HEAD:
                        return
                    try:
                        chunk = await stream.receive_some(4096)
                    except trio.BrokenResourceError:
                        return
                    if not chunk:
                        return
                    head += chunk
                request_line = bytes(head).split(b"\n", 1)[0].decode("latin-1").split()
                if len(request_line) >= 2 and request_line[0] in ("GET", "HEAD"):
                    path = request_line[1].split("?", 1)[0]
                    if path == "/metrics":
                        body = self.render()
                        status, content_type = "200 OK", CONTENT_TYPE_LATEST
                    else:
                        body = b"p2pfl metrics are at /metrics\n"
                        status, content_type = "404 Not Found", "text/plain; charset=utf-8"
                    if request_line[0] == "HEAD":
                        body = b""
                else:
                    body = b"only GET\n"
                    status, content_type = "405 Method Not Allowed", "text/plain; charset=utf-8"
                response = (
                    f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode() + body
                try:
                    await stream.send_all(response)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


# ---- logging ----------------------------------------------------------------------------------

_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


class StructuredFormatter(logging.Formatter):
    """One line per record: ``logfmt`` or JSON, with the record's extra fields."""

    def __init__(self, fmt: str = "logfmt", *, timestamps: bool = True) -> None:
        super().__init__()
        if fmt not in ("logfmt", "json"):
            raise ValueError(f"unknown log format {fmt!r}")
        self.fmt = fmt
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if self.timestamps:
            fields["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
                f".{int(record.msecs):03d}Z"
            )
        fields["level"] = record.levelname.lower()
        fields["logger"] = record.name
        fields["msg"] = record.getMessage()
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                # An extra named like a base field ("level", "msg") must not overwrite it.
                fields[f"{key}_" if key in fields else key] = value
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.fmt == "json":
            return json.dumps(fields, default=str, separators=(",", ":"))
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())


def _logfmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if text and not any(c in text for c in ' ="\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def configure_logging(
    level: str = "info",
    fmt: str = "logfmt",
    stream: TextIO | None = None,
    *,
    file: Path | None = None,
) -> None:
    """Send the ``p2pfl`` loggers to stderr as structured lines at ``level``, and to ``file``.

    The file is appended to (0600 when created) and reopened when it is moved or deleted, so
    logrotate needs no ``copytruncate``; its lines always carry timestamps. Raises OSError if it
    cannot be opened.
    """
    logger = logging.getLogger("p2pfl")
    for handler in list(logger.handlers):
        if getattr(handler, "_p2pfl", False):
            logger.removeHandler(handler)
            if isinstance(handler, logging.FileHandler):
                handler.close()
    to_stderr = logging.StreamHandler(stream or sys.stderr)
    to_stderr._p2pfl = True  # type: ignore[attr-defined]
    journald = bool(os.environ.get("JOURNAL_STREAM"))  # journald stamps lines itself
    to_stderr.setFormatter(StructuredFormatter(fmt, timestamps=not journald))
    logger.addHandler(to_stderr)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        to_file = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
        to_file._p2pfl = True  # type: ignore[attr-defined]
        to_file.setFormatter(StructuredFormatter(fmt, timestamps=True))
        logger.addHandler(to_file)
    logger.propagate = False
    set_log_level(level)


def set_log_level(level: str) -> None:
    """Change the level at run time (SIGHUP reload)."""
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
    logging.getLogger("p2pfl").setLevel(_LEVELS[level])
