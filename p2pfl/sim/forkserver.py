"""Start many daemons from one warm interpreter: import once, fork each daemon into its namespace.

A cold ``python -m p2pfl run`` spends about 2 CPU-seconds importing torch, aiortc, trio and the
project before it does anything; ten daemons on one machine paid that ten times, at the same
moment, on the same cores. The processes engine instead starts one *fork server*
(``python -m p2pfl.sim.forkserver ROOT``): it imports everything a daemon imports
(:data:`PRELOAD`) and then waits, single-threaded, for requests on its stdin. For each request it
forks; the child becomes a session leader, enters the node's network namespace with setns(2),
sends its output to the node's log file and runs exactly what ``p2pfl run --config FILE`` runs.
The daemons are real processes, each in its own namespace with its own sockets, keys and threads;
the imported code and data are shared copy-on-write (``gc.freeze()`` keeps the collector from
touching, and so copying, the preloaded objects).

Fork is only safe before any thread exists: a lock held by another thread at fork time stays
locked in the child forever, and OpenMP's thread pool does not survive a fork. The server
therefore never runs torch code or starts an event loop, and it checks before every fork that it
has exactly one thread (``/proc/self/task``), refusing otherwise. (Loading numpy starts OpenBLAS's
thread pool unless ``OPENBLAS_NUM_THREADS=1``, which the server is given: the daemons' numpy then
runs single-threaded, which is all it does here; learning runs on torch's own BLAS.) The daemon
starts its threads (torch's intra-op pool, the asyncio bridge, the executor) after the fork, as a
cold one does.

Protocol (one JSON object per line): the server writes ``{"ready": N}`` (N = its threads) once
loaded; then for each request ``{"argv": [...], "netns": PATH|null, "log": PATH, "name": NAME,
"cwd": PATH}`` it answers ``{"pid": PID}`` or ``{"error": TEXT}``, and whenever a daemon ends
``{"exit": PID, "code": CODE}`` (CODE as :attr:`subprocess.Popen.returncode`: negative for a
signal). On end of input it exits; daemons already started run on (the harness stops them, and
the namespaces' deletion kills any left).

:class:`ForkServer` is the harness side; :class:`ForkedProcess` is the part of
:class:`subprocess.Popen` the harness uses (``pid``, ``poll``, ``wait``, ``send_signal``, ``kill``,
``returncode``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["PRELOAD", "ForkServer", "ForkServerError", "ForkedProcess"]

PRELOAD = (
    # What `p2pfl run` imports on its way to a ready, learning daemon (see bench_startup.py).
    "p2pfl.cli",
    "p2pfl.cli._errors",
    "p2pfl.cli._run",
    "p2pfl.daemon.bridge",
    "p2pfl.daemon.config",
    "p2pfl.daemon.control",
    "p2pfl.daemon.datachannel",
    "p2pfl.daemon.discovery",
    "p2pfl.daemon.dtls",  # with aiortc: a daemon imports them at its first link
    "p2pfl.daemon.sctp",
    "p2pfl.daemon.limits",
    "p2pfl.daemon.metrics",
    "p2pfl.daemon.node",
    "p2pfl.daemon.signaling",
    "p2pfl.daemon.trainer",
    "p2pfl.daemon.transport",
    "p2pfl.learning.codecs",
    "p2pfl.learning.factory",
    "p2pfl.learning.neighbours",
    "p2pfl.learning.ops",
    "p2pfl.ml",
    "p2pfl.ml.aggregation",
    "p2pfl.ml.catalog",
    "p2pfl.ml.digits",
    "p2pfl.ml.executor",
    "p2pfl.ml.models",
    "p2pfl.ml.task",
    "p2pfl.ml.train",
    "p2pfl.wire",
    "aiortc",
    "ifaddr",
    "torch",
    "torch.nn",
    "torch.optim",
    "trio",
    "uvloop",
    "zeroconf",
)

_CLONE_NEWNET = 0x40000000
_PR_SET_NAME = 15
_READY_TIMEOUT_S = 120.0


class ForkServerError(RuntimeError):
    """The fork server could not start or could not start a daemon; the message says why."""


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


# ---- the server (its own process) -------------------------------------------------------------


def _write(out: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(out, data) :]


def serve(root: str) -> int:
    """The server's main loop: preload, answer ``ready``, fork on request, report exits."""
    del root  # only on the command line, so that `ps` and the cleanup tests see the run's folder
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the preloaded objects stay out of the collector's sight: no copy-on-collect
    requests, replies = sys.stdin.fileno(), sys.stdout.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    own_fds = (requests, replies, wake_r, wake_w)
    _write(replies, {"ready": _threads()})
    buffer = b""
    while True:
        readable, _, _ = select.select([requests, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 4096):
                    pass
        _reap(replies)
        if requests not in readable:
            continue
        chunk = os.read(requests, 65536)
        if not chunk:
            return 0
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            _write(replies, _spawn(json.loads(line), own_fds))


def _reap(replies: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _write(replies, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _spawn(request: dict[str, Any], own_fds: tuple[int, ...]) -> dict[str, Any]:
    threads = _threads()
    if threads != 1:  # a fork now could copy a held lock or a dead thread pool: refuse
        return {"error": f"the fork server has {threads} threads; it forks only with one"}
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = _child(request, own_fds)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    return {"pid": pid}


def _child(request: dict[str, Any], own_fds: tuple[int, ...]) -> int:
    """In the forked child: become the daemon of ``request`` (never returns to the server)."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for fd in {null, log, *own_fds} - {0, 1, 2}:
        os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's own standard streams)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    libc = ctypes.CDLL(None, use_errno=True)
    name = str(request.get("name", "p2pfl"))[:15].encode()
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    if request.get("netns"):
        target = os.open(request["netns"], os.O_RDONLY)
        if libc.setns(target, _CLONE_NEWNET) != 0:
            error = os.strerror(ctypes.get_errno())
            print(f"p2pfl: cannot enter {request['netns']}: {error}", file=sys.stderr)
            return 1
        os.close(target)
    os.chdir(request.get("cwd") or "/")
    os.environ.pop("NOTIFY_SOCKET", None)
    os.environ["PYTHONUNBUFFERED"] = "1"
    from p2pfl.cli import main

    main(args=list(request["argv"]), prog_name="p2pfl")  # `run` ends in os._exit
    return 0


# ---- the harness side -------------------------------------------------------------------------


class ForkedProcess:
    """A daemon forked by a :class:`ForkServer`: the part of ``subprocess.Popen`` we use."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server._exit_code(self.pid, timeout=0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            self.returncode = self.server._exit_code(self.pid, timeout=left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """Starts the server process (``log``: its own stderr); it loads while the caller goes on."""

    def __init__(self, root: Path, log: Path) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._exits: dict[int, int] = {}
        self._replies: list[dict[str, Any]] = []
        self._closed = False
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115 (closed in close())
        # numpy's OpenBLAS starts a thread pool when it is loaded: with one BLAS thread it starts
        # none, and the server stays single-threaded (the daemons use torch's BLAS for learning).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "p2pfl.sim.forkserver", str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            # Its own session: a Ctrl-C at the terminal is for the harness, which stops it.
            start_new_session=True,
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._in = self._process.stdin
        self._out = self._process.stdout.fileno()
        self._ready = False  # the server loads meanwhile; the first spawn() waits for it

    def _wait_ready(self) -> None:
        if self._ready:
            return
        reply = self._reply(_READY_TIMEOUT_S)
        if reply.get("ready") != 1:
            raise ForkServerError(f"the fork server did not load as expected: {reply}")
        self._ready = True

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(
        self, argv: list[str], *, log: Path, netns: str | None = None, name: str = "p2pfl"
    ) -> ForkedProcess:
        """Fork ``p2pfl ARGV`` inside the namespace file ``netns`` (e.g. /run/netns/NAME)."""
        request = {"argv": argv, "netns": netns, "log": str(log), "name": name, "cwd": os.getcwd()}
        with self._lock:
            self._wait_ready()
            self._in.write((json.dumps(request) + "\n").encode())
            self._in.flush()
            reply = self._reply(30.0)
        if "pid" not in reply:
            raise ForkServerError(f"the fork server could not start {name}: {reply.get('error')}")
        return ForkedProcess(self, int(reply["pid"]))

    def _reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._replies:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pump(left):
                raise ForkServerError(
                    f"no answer from the fork server (exit status {self._process.poll()}); "
                    f"see {self._log.name}"
                )
        return self._replies.pop(0)

    def _pump(self, timeout: float | None) -> bool:
        """Read what the server wrote within ``timeout``; False once it has ended."""
        if self._closed:
            return False
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            return True
        chunk = os.read(self._out, 65536)
        if not chunk:
            self._closed = True
            return False
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if "exit" in message:
                self._exits[int(message["exit"])] = int(message["code"])
            else:
                self._replies.append(message)
        return True

    def _exit_code(self, pid: int, timeout: float | None) -> int | None:
        """``pid``'s exit status once the server reports it within ``timeout``, else None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while pid not in self._exits:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._pump(left):  # the server is gone: it cannot tell us any more
                    if Path(f"/proc/{pid}").exists():
                        if left == 0.0:
                            return None
                        time.sleep(min(0.1, left or 0.1))
                        continue
                    return -signal.SIGKILL
                if left == 0.0:
                    break
            return self._exits.get(pid)

    def close(self, timeout: float = 10.0) -> None:
        """End the server (its daemons are the caller's to stop); idempotent."""
        if self._log.closed:
            return
        with contextlib.suppress(OSError):
            self._in.close()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        with contextlib.suppress(OSError):
            self._process.stdout.close()  # type: ignore[union-attr]
        self._closed = True
        self._log.close()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1] if len(sys.argv) > 1 else ""))
