"""A private test network: nothing sent inside it can reach an address outside this machine.

Tests, benchmarks and the multi-process simulation harness run their nodes inside network
namespaces created here. Two layouts:

``SharedNetwork``
    One namespace for all nodes. Its only interface is loopback, brought up with the alias
    addresses 127.0.0.2, 127.0.0.3, ... (one per node; aioice ignores exactly 127.0.0.1 and ::1
    when gathering ICE candidates, but takes the aliases) and multicast enabled on it, so mDNS
    works between nodes. Cheapest; no per-node faults.

``BridgedNetwork``
    One namespace per node, each joined by a veth pair to a bridge that lives in a hub
    namespace (10.77.0.0/24, node i has 10.77.0.(i+2) on ``eth0``). Multicast crosses the bridge,
    so mDNS works; ``impair(i, delay_ms=, loss_pct=)`` puts a ``tc netem`` qdisc on a node's
    interface, so faults are per node. The hub has no route anywhere else.

Privileges (what needs what):

* root (CAP_SYS_ADMIN + CAP_NET_ADMIN, e.g. CI): everything below works directly. Namespaces are
  named ``p2pfl-<pid>-p<pid namespace inode>-<n>...`` and created with ``ip netns add``.
* ordinary user: the kernel must allow unprivileged user namespaces
  (``user.max_user_namespaces`` > 0; on Debian/Ubuntu also ``kernel.unprivileged_userns_clone=1``
  and no AppArmor restriction). Run the whole command (pytest, a benchmark, the harness) under
  ``python -m p2pfl.sim.netns -- CMD ...``: it re-executes CMD inside
  ``unshare --user --map-root-user --net --mount`` with a private tmpfs on ``/run/netns``, where
  the process is root of its own user namespace and ``ip netns`` works unchanged. Everything it
  creates dies with it, whatever happens.
* ``impair()`` also needs the kernel's ``sch_netem`` qdisc; ``netem_available()`` says whether it
  is there (some VM kernels lack it; they refuse with "Specified qdisc kind is unknown").

Running code inside a namespace: ``command(argv)`` prefixes ``ip netns exec NAME`` for a child
process (the multi-process harness and the SIGKILL tests start real node processes that way);
``enter()`` moves the *calling thread* into the namespace with setns(2) and back out on exit.
Threads started while inside inherit the namespace, so a test that enters first and then starts
its nodes (their asyncio bridge threads included) runs wholly inside; the process's other threads
are untouched. Sockets keep the namespace they were created in.

Cleanup is guaranteed three ways: ``close()`` (context-manager exit, on any exception,
KeyboardInterrupt, or SIGTERM, which is turned into SystemExit while SIGTERM has its default
action) kills processes still inside our namespaces and deletes them; an ``atexit`` hook closes
networks that were never closed; and every new network first deletes namespaces left by p2pfl
processes that no longer exist (only SIGKILL leaves them behind).

``python -m p2pfl.sim.netns -- CMD`` (root or not) runs CMD as its child: it passes SIGINT,
SIGTERM and SIGHUP on (a Ctrl-C typed at the terminal reaches CMD directly and is not passed on
twice), waits, and exits with CMD's status, so CMD does its own cleanup and chooses its status
(``p2pfl simulate`` exits 130 after Ctrl-C, 143 after SIGTERM, having removed everything).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BridgedNetwork",
    "NetnsError",
    "NodeNamespace",
    "SharedNetwork",
    "can_create_namespaces",
    "netem_available",
    "run_in_private_userns",
    "supervise",
    "sweep_stale_namespaces",
]

_PREFIX = "p2pfl"
_NAME_RE = re.compile(rf"^{_PREFIX}-(\d+)-(?:p(\d+)-)?")
_CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_live: set[_Network] = set()
_live_lock = threading.Lock()


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the command and how to fix it."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args]
    try:
        # Its own process group: a Ctrl-C typed at the terminal must not kill an `ip netns del`
        # of the cleanup that Ctrl-C started.
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False, process_group=0
        )
    except FileNotFoundError as exc:
        raise NetnsError("the `ip` command (iproute2) is not installed; install iproute2") from exc
    if check and done.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed: {done.stderr.strip()}. Namespaces need root, or run "
            "the command under `python -m p2pfl.sim.netns -- ...` as an ordinary user."
        )
    return done


def _netns_exec(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _ip("netns", "exec", name, *args, check=check)


def can_create_namespaces() -> bool:
    """True when this process may create network namespaces with ``ip netns`` right now."""
    if shutil.which("ip") is None:
        return False
    probe = f"{_PREFIX}-{os.getpid()}-probe{next(_counter)}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    _ip("netns", "del", probe, check=False)
    return True


_netem_cache: bool | None = None


def netem_available() -> bool:
    """True when the kernel offers the ``netem`` qdisc (probed once in a throwaway namespace)."""
    global _netem_cache
    if _netem_cache is None:
        probe = f"{_PREFIX}-{os.getpid()}-netem{next(_counter)}"
        if _ip("netns", "add", probe, check=False).returncode != 0:
            _netem_cache = False
        else:
            try:
                done = _netns_exec(
                    probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                    check=False,
                )  # fmt: skip
                _netem_cache = done.returncode == 0
            finally:
                _ip("netns", "del", probe, check=False)
    return _netem_cache


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_namespace() -> int:
    """The inode of this process's PID namespace: a pid means something only inside it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def sweep_stale_namespaces() -> list[str]:
    """Delete ``p2pfl-<pid>-p<pidns>-*`` namespaces whose creating process is gone; return them.

    Only namespaces made in our own PID namespace are judged: a process in another one (a
    container, ``unshare --pid``) shares /run/netns but not pids, and its pid 42 is not ours.
    """
    done = _ip("netns", "list", check=False)
    removed = []
    own = str(_pid_namespace())
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME_RE.match(name)
        if match is None or (match.group(2) is not None and match.group(2) != own):
            continue
        if not _pid_alive(int(match.group(1))):
            _kill_pids_in(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _kill_pids_in(name: str) -> None:
    done = _ip("netns", "pids", name, check=False)
    for token in done.stdout.split():
        pid = int(token)
        if pid != os.getpid():  # a thread of ours may have entered; never kill ourselves
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetnsError(f"setns(2) into a network namespace failed: {os.strerror(errno)}")


@contextlib.contextmanager
def _entered(name: str) -> Iterator[None]:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _libc_setns(target)
        try:
            yield
        finally:
            _libc_setns(own)
    finally:
        os.close(target)
        os.close(own)


@dataclass(frozen=True, slots=True)
class NodeNamespace:
    """Where node ``index`` lives: its namespace name, address and interface."""

    index: int
    namespace: str
    address: str
    interface: str


class _Network:
    """Owns a set of namespaces; deletes them on close (idempotent)."""

    def __init__(self) -> None:
        self._namespaces: list[str] = []
        self._closed = False
        self.tag = f"{_PREFIX}-{os.getpid()}-p{_pid_namespace()}-{next(_counter)}"

    def _add_namespace(self, suffix: str) -> str:
        name = f"{self.tag}{suffix}"
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _netns_exec(name, "ip", "link", "set", "lo", "up")
        return name

    def _open(self, build: Callable[[], None]) -> None:
        sweep_stale_namespaces()
        _exit_cleanly_on_sigterm()
        with _live_lock:
            _live.add(self)
        try:
            build()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill every process still inside our namespaces, then delete the namespaces."""
        if self._closed:
            return
        self._closed = True
        for name in reversed(self._namespaces):
            _kill_pids_in(name)
            _ip("netns", "del", name, check=False)
        with _live_lock:
            _live.discard(self)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self._namespaces)


class SharedNetwork(_Network):
    """One namespace shared by ``n_nodes`` nodes, addresses 127.0.0.2 ... on loopback."""

    def __init__(self, n_nodes: int) -> None:
        if not 1 <= n_nodes <= 250:
            raise ValueError(f"SharedNetwork: n_nodes must be 1..250, got {n_nodes}")
        super().__init__()
        self.n_nodes = n_nodes
        self.name = ""
        self._open(self._build)

    def _build(self) -> None:
        self.name = self._add_namespace("")
        # Multicast on loopback plus a route for 224/4: mDNS between nodes of this namespace.
        _netns_exec(self.name, "ip", "link", "set", "lo", "multicast", "on")
        _netns_exec(self.name, "ip", "route", "add", "224.0.0.0/4", "dev", "lo")
        for address in self.addresses:
            _netns_exec(self.name, "ip", "addr", "add", f"{address}/8", "dev", "lo")

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.{i + 2}" for i in range(self.n_nodes)]

    @property
    def nodes(self) -> list[NodeNamespace]:
        return [NodeNamespace(i, self.name, a, "lo") for i, a in enumerate(self.addresses)]

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace (for ``subprocess`` or trio)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def enter(self) -> contextlib.AbstractContextManager[None]:
        """Move the calling thread (and threads it starts meanwhile) into the namespace."""
        return _entered(self.name)

    def __enter__(self) -> SharedNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BridgedNetwork(_Network):
    """One namespace per node, veth pairs to a bridge in a hub namespace; netem per node."""

    SUBNET = "10.77.0"

    def __init__(self, n_nodes: int) -> None:
        if not 1 <= n_nodes <= 250:
            raise ValueError(f"BridgedNetwork: n_nodes must be 1..250, got {n_nodes}")
        super().__init__()
        self.n_nodes = n_nodes
        self.hub = ""
        self.nodes: list[NodeNamespace] = []
        self._open(self._build)

    def _build(self) -> None:
        self.hub = self._add_namespace("h")
        _netns_exec(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        _netns_exec(self.hub, "ip", "link", "set", "br0", "up")
        for i in range(self.n_nodes):
            name = self._add_namespace(f"n{i}")
            port = f"p{i}"
            # Both ends are born in the hub; one moves into the node namespace as eth0.
            _netns_exec(self.hub, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0")
            _netns_exec(self.hub, "ip", "link", "set", "eth0", "netns", name)
            _netns_exec(self.hub, "ip", "link", "set", port, "master", "br0")
            _netns_exec(self.hub, "ip", "link", "set", port, "up")
            address = f"{self.SUBNET}.{i + 2}"
            _netns_exec(name, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            _netns_exec(name, "ip", "link", "set", "eth0", "up")
            self.nodes.append(NodeNamespace(i, name, address, "eth0"))

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def command(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside node ``index``'s namespace."""
        return ["ip", "netns", "exec", self.nodes[index].namespace, *argv]

    def enter(self, index: int) -> contextlib.AbstractContextManager[None]:
        """Move the calling thread into node ``index``'s namespace (see module docstring)."""
        return _entered(self.nodes[index].namespace)

    def impair(self, index: int, *, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Delay and drop node ``index``'s outgoing packets with ``tc netem`` (replaces earlier)."""
        if not netem_available():
            raise NetnsError(
                "tc netem is not available in this kernel (sch_netem missing); "
                "load the sch_netem module or use a kernel built with CONFIG_NET_SCH_NETEM"
            )
        node = self.nodes[index]
        _netns_exec(
            node.namespace, "tc", "qdisc", "replace", "dev", node.interface, "root", "netem",
            "delay", f"{delay_ms:g}ms", "loss", f"{loss_pct:g}%",
        )  # fmt: skip

    # A MAC address no interface has: frames sent to it cross the bridge but every node drops
    # them (locally administered, unicast).
    _NOWHERE = "02:00:00:00:00:01"

    def cut(self, a: int, b: int) -> None:
        """Cut the link between nodes ``a`` and ``b``: their unicast packets vanish silently.

        Each side gets a permanent neighbour entry pointing the other's address at a MAC no
        interface has, so nothing answers and no error is reported: to the daemons it looks
        like a broken link (WebRTC consent fails, TCP retries). Only ``ip`` is needed: this
        kernel has neither VLAN-filtering bridges, tc actions nor iptables/nftables.
        Multicast (mDNS) still crosses: peers may be discovered but cannot connect.
        """
        for x, y in ((a, b), (b, a)):
            node = self.nodes[x]
            _netns_exec(
                node.namespace, "ip", "neigh", "replace", self.nodes[y].address,
                "lladdr", self._NOWHERE, "dev", node.interface, "nud", "permanent",
            )  # fmt: skip

    def heal(self, a: int, b: int) -> None:
        """Undo :meth:`cut`: the nodes resolve each other with ARP again."""
        for x, y in ((a, b), (b, a)):
            node = self.nodes[x]
            _netns_exec(
                node.namespace, "ip", "neigh", "del", self.nodes[y].address,
                "dev", node.interface, check=False,
            )  # fmt: skip

    def __enter__(self) -> BridgedNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM unwind (finally blocks, atexit) instead of killing us with namespaces left.

    Only where SIGTERM still has its default action and we are on the main thread.
    """
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)


@atexit.register
def _close_all() -> None:
    with _live_lock:
        networks = list(_live)
    for network in networks:
        network.close()


def _userns_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run as root of a fresh user+net+mount namespace (see below)."""
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        setup = "mount -t tmpfs p2pfl /run/netns"
    else:
        setup = "mount -t tmpfs p2pfl /run && mkdir -p /run/netns"
    script = f'{setup} && ip link set lo up && exec "$@"'
    unshare = [
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "--mount",
        "--propagation",
        "private",
    ]
    # unshare and sh both exec: the child's pid is the command's own.
    return [*unshare, "sh", "-c", script, "p2pfl-netns", *argv]


def run_in_private_userns(argv: Sequence[str]) -> int:
    """Run ``argv`` as root of a fresh user+net+mount namespace where ``ip netns`` works.

    For ordinary users; the namespaces created inside disappear when ``argv`` exits (files it
    writes outside, such as temporary folders, are its own to remove).
    """
    return supervise(_userns_argv(argv))


_FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_SI_KERNEL = 0x80
"""``si_code`` of a signal the kernel sent. A SIGINT from the kernel is a Ctrl-C typed at our
terminal, sent to the whole foreground process group, our child included. (A hangup's SIGHUP
goes to the session leader alone, so that one is passed on.)"""


def supervise(argv: Sequence[str]) -> int:
    """Run ``argv`` as a child and wait for it, passing SIGINT, SIGTERM and SIGHUP on.

    Returns the child's exit status, or 128 + N when signal N killed it (the shell's convention),
    so that the child, not this wrapper, decides how an interruption ends: it cleans up and exits
    130 or 143. A Ctrl-C typed at the terminal is not passed on: the child, in our process
    group, has it already from the terminal, and a second one could cut its cleanup short.
    Never raises KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        return subprocess.call(list(argv))
    watched = {*_FORWARDED, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        try:
            pid = os.posix_spawnp(argv[0], list(argv), os.environ, setsigmask=previous)
        except OSError as exc:
            print(
                f"p2pfl: cannot run {argv[0]}: {exc.strerror}; check the command", file=sys.stderr
            )
            return 127
        while True:
            info = signal.sigwaitinfo(watched)
            if info.si_signo == signal.SIGCHLD:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    return code if code >= 0 else 128 - code
            elif not (info.si_signo == signal.SIGINT and info.si_code == _SI_KERNEL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, info.si_signo)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _main(args: list[str]) -> int:
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m p2pfl.sim.netns -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    if os.geteuid() == 0 and can_create_namespaces():
        return supervise(args)
    return supervise(_userns_argv(args))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
