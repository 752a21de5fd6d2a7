"""The private test network: isolated, addressed as documented, always cleaned up."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.sim.netns import BridgedNetwork, SharedNetwork, sweep_stale_namespaces


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.netns
def test_shared_network_has_loopback_aliases_and_no_route_out() -> None:
    outside = os.readlink("/proc/thread-self/ns/net")
    with SharedNetwork(3) as net:
        assert net.addresses == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        with net.enter():
            assert os.readlink("/proc/thread-self/ns/net") != outside
            # The aliases are bindable inside; outside addresses are unreachable.
            with socket.socket() as listener:
                listener.bind(("127.0.0.3", 0))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                with pytest.raises(OSError) as caught:
                    probe.connect(("192.0.2.1", 9))  # TEST-NET-1: there must be no route
                assert caught.value.errno == errno.ENETUNREACH
        # Back outside, the thread's namespace is the original one again.
        assert os.readlink("/proc/thread-self/ns/net") == outside
    assert net.name not in _namespaces()


@pytest.mark.netns
def test_bridged_nodes_reach_each_other_and_nothing_else() -> None:
    with BridgedNetwork(2) as net:
        assert net.addresses == ["10.77.0.2", "10.77.0.3"]
        script = (
            "import socket,sys; s=socket.socket(); s.settimeout(5);"
            "s.bind((sys.argv[1],0)); s.listen(); print(s.getsockname()[1], flush=True);"
            "c,_=s.accept(); c.sendall(b'hi')"
        )
        with subprocess.Popen(
            net.command(1, [sys.executable, "-c", script, net.addresses[1]]),
            stdout=subprocess.PIPE,
            text=True,
        ) as server:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            with net.enter(0), socket.create_connection((net.addresses[1], port), 5) as conn:
                assert conn.recv(2) == b"hi"
            server.wait(timeout=5)
        with net.enter(0), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            with pytest.raises(OSError) as caught:
                probe.connect(("192.0.2.1", 9))
            assert caught.value.errno == errno.ENETUNREACH
        names = set(net.namespaces)
    assert names.isdisjoint(_namespaces())


@pytest.mark.netns
def test_namespaces_are_deleted_when_the_test_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), BridgedNetwork(2) as net:
        names = set(net.namespaces)
        assert names <= _namespaces()
        raise RuntimeError("boom")
    assert names.isdisjoint(_namespaces())


@pytest.mark.netns
def test_namespaces_left_by_a_killed_process_are_swept() -> None:
    # A child creates a network and is SIGKILLed before it can clean up.
    code = (
        "import os, signal; from p2pfl.sim.netns import SharedNetwork;"
        "net = SharedNetwork(1); print(net.name, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    name = child.stdout.strip()
    assert child.returncode == -9
    assert name in _namespaces()
    assert name in sweep_stale_namespaces()
    assert name not in _namespaces()


@pytest.mark.netns
@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not os.access("/usr/bin/python3", os.X_OK),
    reason="needs root (to become an ordinary user), setpriv and /usr/bin/python3",
)
def test_ordinary_user_gets_a_private_network_through_the_netns_wrapper() -> None:
    # p2pfl.sim.netns needs only the standard library, so the system Python runs it as `nobody`
    # (the venv's interpreter may live under root's home, which nobody can enter).
    repo = str(Path(__file__).resolve().parents[2])
    python = "/usr/bin/python3"
    code = "from p2pfl.sim.netns import SharedNetwork; print(SharedNetwork(2).addresses)"
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    command = [python, "-c", code]
    done = subprocess.run(
        [*drop, "env", f"PYTHONPATH={repo}", python, "-m", "p2pfl.sim.netns", "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "Operation not permitted" in done.stderr and "unshare" in done.stderr:
        pytest.skip(f"unprivileged user namespaces are disabled here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['127.0.0.2', '127.0.0.3']"


@pytest.mark.netns
def test_sigterm_during_a_run_still_deletes_the_namespaces() -> None:
    code = (
        "import sys, time; from p2pfl.sim.netns import BridgedNetwork\n"
        "with BridgedNetwork(2) as net:\n"
        "    print(' '.join(net.namespaces), flush=True); time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        names = set(child.stdout.readline().split())
        assert len(names) == 3 and names <= _namespaces()
        child.terminate()
        assert child.wait(timeout=20) == 128 + 15
    assert names.isdisjoint(_namespaces())
