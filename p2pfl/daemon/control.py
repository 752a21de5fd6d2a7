"""The control socket: how `p2pfl status`, `peers` and `stop` talk to a running daemon.

A Unix stream socket ``control.sock`` in the runtime directory; the directory is 0700 and the
socket 0600, both owned by the daemon's user, so only that user (and root) can connect. The
protocol is JSON lines: one request object ``{"cmd": "status"}`` per line, one reply per line,
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``. Commands: ``status``,
``peers`` and ``stop`` (stop as on SIGTERM; the reply comes before the daemon exits).

The server side runs in the daemon's trio nursery; the client side is plain blocking sockets and
imports no trio, so the CLI starts fast.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.daemon.drops import DropLog, contained

if TYPE_CHECKING:
    import trio

_log = logging.getLogger("p2pfl.daemon.control")

MAX_LINE = 64 * 1024
"""Longest request line the server reads; longer requests close the connection."""
MAX_REPLY = 16 * 1024 * 1024
IDLE_TIMEOUT_S = 30.0

Handler = Callable[[Mapping[str, Any]], "Mapping[str, Any] | Awaitable[Mapping[str, Any]]"]


@dataclass(frozen=True, slots=True)
class PeerStatus:
    node_id: str
    name: str
    state: str
    """"connected", "connecting", "down" or "refused"."""
    rtt_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    last_seen: float | None = None
    """Unix time of the last frame from this peer."""
    rejected: int = 0
    """Messages from this peer dropped by verification, decoding or validation."""
    drops: dict[str, int] = field(default_factory=dict)
    """Everything dropped from this peer, by stage (signaling, link, envelope, update, ...)."""
    address: str | None = None
    """The peer's end of the ICE pair in use, "ip:port" (None: not connected, or unknown)."""
    ice_path: str | None = None
    """"host" (direct), "server reflexive" (through a NAT, via STUN) or "relayed" (TURN)."""


@dataclass(frozen=True, slots=True)
class CheckpointStatus:
    seq: int
    digest: str
    created: float


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: str
    short_id: str
    name: str
    version: str
    pid: int
    started_at: float
    now: float
    federation_id: str | None
    trust_mode: str
    protocol: str
    task: str
    round: int
    model_updated_at: float | None
    last_loss: float | None
    metric_name: str
    metric_value: float | None
    training_state: str
    """"starting", "idle", "training" or "stopping"."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last evaluation of the adopted model on this node's test data, every metric."""
    bytes_in: int = 0
    bytes_out: int = 0
    training_seconds: float = 0.0
    protocol_seconds: float = 0.0
    """Encoding, signing, verifying and decoding messages: the protocol's overhead."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Rejected messages by reason (all peers, and senders that never became peers): the
    ``envelope`` and ``update`` stages of ``drops``."""
    drops_by_stage: dict[str, int] = field(default_factory=dict)
    """Everything this node refused or dropped, by stage (see ``p2pfl.daemon.drops``)."""
    drops: dict[str, int] = field(default_factory=dict)
    """The same, by ``"stage/reason"``."""
    checkpoint: CheckpointStatus | None = None
    training: dict[str, Any] = field(default_factory=dict)
    """Local training (``NodeTrainer.status``): trainings done, the last one's learning-rate
    factor and steps, this session's steps, the kept Adam moments' steps (keep_optimizer)."""
    peers: tuple[PeerStatus, ...] = ()
    feature_bytes_sent: int = 0
    feature_bytes_received: int = 0
    """Graph tasks: node features (halo sensor readings) exchanged with peers."""
    live: dict[str, Any] | None = None
    """Live operation ([data] replay_speed): replay step, rolling forecast MAE by horizon, age of
    each owner's newest pushed halo reading (``p2pfl.daemon.live.LiveFeed.status``)."""
    halo: dict[str, Any] | None = None
    """Graph tasks: the halo readings received from each owner and those masked because their
    owner did not answer (``p2pfl.learning.features.HaloStore.status``); None: no halo."""
    sampling: dict[str, Any] | None = None
    """[limits] max_peers: the active view (the links), the links being opened, the passive view
    (member id -> age), the bound, the links the transport holds now and at most, the shuffles
    started and link events (``p2pfl.daemon.sampling.SampledLinks.status``); None: no bound."""
    transport: dict[str, int] = field(default_factory=dict)
    """Transport counters (dial failures, refused signaling, dropped frames...) by name."""
    revocation_serial: int | None = None
    """Serial of the federation revocation list this node holds (None: none)."""
    revoked: int = 0
    """Members that list revokes."""
    mdns: bool | None = None
    """Whether the daemon looks for peers with mDNS (None: a daemon too old to say)."""
    static_peers: int | None = None
    """How many static peers it dials."""
    log_file: str | None = None
    """Where the daemon appends its log ([logging] file; None: stderr only)."""
    systemd_unit: str | None = None
    """The systemd unit it runs as (its stderr is in journald), None when not under systemd."""

    def warnings(self) -> list[str]:
        if self.trust_mode == "open":
            return [
                "trust mode is OPEN: any machine on the network can join this federation and "
                'send it models; set [trust] mode = "federation" for real deployments'
            ]
        return []

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["warnings"] = self.warnings()
        return data


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``data`` that are fields of ``cls``: a newer daemon may send more."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _node_status_from_json(data: Mapping[str, Any]) -> NodeStatus:
    values = _known(NodeStatus, data)
    values["peers"] = tuple(
        PeerStatus(**_known(PeerStatus, peer)) for peer in data.get("peers", ())
    )
    if data.get("checkpoint") is not None:
        values["checkpoint"] = CheckpointStatus(**data["checkpoint"])
    return NodeStatus(**values)


# ---- client -----------------------------------------------------------------------------------


class ControlError(Exception):
    """The daemon could not be asked; the message is one line a person can act on."""


class DaemonNotRunning(ControlError):
    pass


def request(socket_path: Path, cmd: str, *, timeout: float = 5.0, **args: Any) -> Any:
    """Send one request and return its ``result`` (every command's is an object); raise
    ControlError with a one-line reason."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"p2pfl daemon is not running (nothing listens on {socket_path}); "
                "start it with `systemctl start p2pfl` or `p2pfl run --config FILE`"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {socket_path}: run as the daemon's user or with sudo"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {socket_path}: {exc.strerror}") from None
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        reply = _read_line(sock, socket_path)
    finally:
        sock.close()
    try:
        message = json.loads(reply)
    except ValueError:
        raise ControlError(f"the daemon on {socket_path} sent a reply that is not JSON") from None
    if not isinstance(message, dict) or "ok" not in message:
        raise ControlError(f"the daemon on {socket_path} sent an unexpected reply")
    if not message["ok"]:
        raise ControlError(f"the daemon refused {cmd!r}: {message.get('error', 'no reason given')}")
    result = message.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"the daemon on {socket_path} sent an unexpected {cmd!r} result")
    return result


def _read_line(sock: socket.socket, socket_path: Path) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError(f"the daemon on {socket_path} closed the connection")
            chunks.append(chunk)
            size += len(chunk)
            if b"\n" in chunk:
                return b"".join(chunks).split(b"\n", 1)[0]
            if size > MAX_REPLY:
                raise ControlError(f"the reply from {socket_path} is too large")
    except TimeoutError:
        raise ControlError(f"the daemon on {socket_path} did not answer in time") from None


def fetch_status(socket_path: Path, *, timeout: float = 5.0) -> NodeStatus:
    reply = request(socket_path, "status", timeout=timeout)
    try:
        return _node_status_from_json(reply)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ControlError(
            f"the daemon on {socket_path} sent a status this p2pfl cannot read: {exc}"
        ) from None


# ---- server -----------------------------------------------------------------------------------


class ControlSocketError(Exception):
    """The control socket cannot be created; says why and what to do."""


def prepare_runtime_dir(directory: Path) -> None:
    """Create ``directory`` 0700, or tighten it to 0700 if it is ours; refuse someone else's."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise ControlSocketError(
            f"runtime directory {directory} belongs to uid {info.st_uid}, not to this user; "
            "set [node] runtime_dir to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        directory.chmod(0o700)


def _remove_stale_socket(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ControlSocketError(
            f"{path} exists and is not a socket; remove it or move runtime_dir"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # left by a daemon that died without cleaning up
        return
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise
    finally:
        probe.close()
    raise ControlSocketError(
        f"another p2pfl daemon is already listening on {path}; stop it first "
        "or give this one its own [node] runtime_dir"
    )


class ControlServer:
    """Serves the JSON-lines control protocol; ``handlers`` map a command to its reply."""

    def __init__(self, socket_path: Path, handlers: Mapping[str, Handler]) -> None:
        self.socket_path = socket_path
        self.handlers = dict(handlers)

    async def serve(
        self, *, drops: DropLog | None = None, task_status: trio.TaskStatus[Path] | None = None
    ) -> None:
        """Listen until cancelled; ``task_status.started(path)`` once connections are accepted.

        Each connection is a contained scope (stage ``endpoint``).
        """
        import trio

        handler = functools.partial(
            contained, drops or DropLog(), "endpoint", None, self._serve_connection
        )

        prepare_runtime_dir(self.socket_path.parent)
        _remove_stale_socket(self.socket_path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)  # the 0700 directory covers the moment before
            identity = self.socket_path.stat().st_ino
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        try:
            async with trio.open_nursery() as nursery:
                listener = trio.SocketListener(sock)
                await nursery.start(trio.serve_listeners, handler, [listener])
                if task_status is not None:
                    task_status.started(self.socket_path)
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                if self.socket_path.stat().st_ino == identity:
                    self.socket_path.unlink()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        import trio

        buffer = bytearray()
        async with stream:
            with trio.move_on_after(IDLE_TIMEOUT_S):
                while True:
                    newline = buffer.find(b"\n")
                    if newline < 0:
                        if len(buffer) > MAX_LINE:
                            await _send(stream, {"ok": False, "error": "request too long"})
                            return
                        try:
                            chunk = await stream.receive_some(65536)
                        except trio.BrokenResourceError:
                            return
                        if not chunk:
                            return
                        buffer += chunk
                        continue
                    line = bytes(buffer[:newline])
                    del buffer[: newline + 1]
                    reply = await self._answer(line)
                    try:
                        await _send(stream, reply)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            message = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with "cmd"'}
        handler = self.handlers.get(message["cmd"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {message['cmd']!r}; known: {known}"}
        try:
            result = handler(message)
            if inspect.isawaitable(result):
                result = await result
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            # A bug behind one command must not take the daemon down with it.
            _log.exception("control command %r failed", message["cmd"])
            return {"ok": False, "error": "internal error; see the daemon's log"}
        return {"ok": True, "result": result}


async def _send(stream: trio.SocketStream, reply: Mapping[str, Any]) -> None:
    await stream.send_all(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
