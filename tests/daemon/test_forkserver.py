"""The fork server: daemons forked from one warm process, each in its own namespace and session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p2pfl.sim.forkserver import ForkServer
from p2pfl.sim.netns import BridgedNetwork, can_create_namespaces
from p2pfl.sim.processes import ClusterSpec, DaemonCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
]


def _wait_status(cluster: DaemonCluster, index: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while cluster.status(index, timeout=2.0) is None:
        process = cluster.nodes[index].process
        assert process is not None and process.poll() is None, cluster.log_tail(index)
        assert time.monotonic() < deadline, cluster.log_tail(index)
        time.sleep(0.3)


@pytest.mark.parametrize("launcher", ["fork", "exec"])
def test_each_daemon_is_its_own_process_in_its_own_namespace_and_session(
    short_tmp: Path, launcher: str
) -> None:
    spec = ClusterSpec(n_nodes=2, params={"period": 3600.0}, mdns=False)
    with (
        BridgedNetwork(2) as network,
        DaemonCluster(short_tmp, spec, network, launcher=launcher) as cluster,
    ):
        cluster.start_all()
        for i in range(2):
            _wait_status(cluster, i, 120)
        pids = [node.process.pid for node in cluster.nodes if node.process is not None]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        for i, pid in enumerate(pids):
            expected = os.stat(f"/run/netns/{network.nodes[i].namespace}").st_ino
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == expected
            assert os.getsid(pid) == pid  # a session of its own: no terminal signal reaches it
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            # Forked: the server's command line (it names the run's folder); exec: `p2pfl run`.
            marker = "p2pfl.sim.forkserver" if launcher == "fork" else "p2pfl run"
            assert marker in cmdline and str(short_tmp) in cmdline
        # The daemons answer as themselves: their own node ids on their own control sockets.
        ids = {cluster.status(i).node_id for i in range(2)}  # type: ignore[union-attr]
        assert ids == {node.identity.node_id for node in cluster.nodes}
        cluster.kill(0, signal.SIGTERM)  # a clean stop: exit status 0
        assert cluster.wait(0, 30) == 0
        cluster.kill(1, signal.SIGKILL)  # reported as Popen reports it
        assert cluster.wait(1, 30) == -signal.SIGKILL
        cluster.start(0)  # a restart forks again from the same server
        _wait_status(cluster, 0, 120)
    assert not Path(f"/proc/{pids[1]}").exists()


def test_a_forked_command_gets_its_exit_status_and_its_own_log(tmp_path: Path) -> None:
    with ForkServer(tmp_path, tmp_path / "server.log") as server:
        bad = server.spawn(["run", "--config", str(tmp_path / "missing.toml")], log=tmp_path / "a")
        version = server.spawn(["--version"], log=tmp_path / "b")
        assert bad.wait(60) == 2  # a configuration error, as `p2pfl run` exits on it
        assert version.wait(60) == 0
    assert "missing.toml" in (tmp_path / "a").read_text()
    assert "p2pfl, version" in (tmp_path / "b").read_text()


def test_what_a_daemon_imports_at_its_first_link_is_preloaded() -> None:
    # A daemon imports aiortc and the tuned SCTP/DTLS modules when it makes its first link,
    # not before READY; a forked daemon must find them preloaded, not import them itself.
    code = textwrap.dedent(
        """
        import asyncio, importlib, sys
        from p2pfl.sim.forkserver import PRELOAD
        for name in PRELOAD:
            importlib.import_module(name)
        before = set(sys.modules)
        from p2pfl.daemon.bridge import new_event_loop
        from p2pfl.daemon.datachannel import LinkSettings, RtcLink

        async def first_link() -> None:
            quiet = lambda _: None
            link = RtcLink(LinkSettings(), on_message=quiet, on_down=quiet, on_drop=quiet)
            await link.create_offer()
            await link.close()

        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(first_link())
        ours = ("p2pfl", "aiortc", "aioice", "av", "OpenSSL")
        print(",".join(sorted(m for m in set(sys.modules) - before if m.startswith(ours))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
