"""Two daemons on different "sites" learn through a real TURN server (coturn).

Three namespaces on one bridge: the TURN server, and two nodes set up the operator's way
(`p2pfl federation init`, `p2pfl init --federation-key`, the printed `federation admit` line).
UDP between the two nodes is refused by a routing rule in each of them, so no direct WebRTC path
exists; TCP between them still works, as for signaling ports a site opens to the federation.
Both nodes use ``ice_transport_policy = "relay"``: they gather only TURN relayed candidates, so
their links can open only through the TURN server. The test waits until both have exchanged
models over that link and checks that `p2pfl peers` shows the path as relayed.

coturn is a Debian package (`apt-get install coturn`); `make test` installs it when run as root
where apt-get exists, and elsewhere this test skips saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pfl.daemon import datachannel
from p2pfl.daemon.bridge import open_bridge
from p2pfl.daemon.datachannel import LinkSettings, RtcLink
from p2pfl.sim.netns import BridgedNetwork, SharedNetwork, can_create_namespaces

TURNSERVER = shutil.which("turnserver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(not can_create_namespaces(), reason="cannot create network namespaces"),
    pytest.mark.skipif(
        TURNSERVER is None,
        reason="needs coturn's turnserver: `apt-get install coturn` (`make test` installs it "
        "when run as root on a system with apt-get)",
    ),
]

TURN_PORT = 3478
SIGNALING_PORT = 7070
TURN_USER, TURN_SECRET = "p2pfl-node", "not-a-real-secret"


@dataclass
class Site:
    index: int  # in the BridgedNetwork
    address: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"p2pfl {' '.join(args)}: {done.stderr}"
    return done.stdout


def _admit_line(init_output: str) -> list[str]:
    """The `p2pfl federation admit ...` line `p2pfl init` prints for the operator."""
    (line,) = [x.strip() for x in init_output.splitlines() if "federation admit" in x]
    return line.split()[1:]  # without the leading "p2pfl"


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, f"the sample configuration no longer has {old!r}"
    return text.replace(old, new, 1)


def _set_up_site(
    root: Path, name: str, index: int, address: str, peer: str, turn: str, federation: Path
) -> Site:
    """A node the operator's way, then configured for a TURN relay only."""
    fed_key = json.loads(_cli("federation", "show", "--json", "--dir", str(federation)))[
        "federation_public_key"
    ]
    home = root / name
    config = home / "p2pfl.toml"
    printed = _cli(
        "init", "--config", str(config), "--state-dir", str(home / "state"), "--name", name,
        "--federation-key", fed_key, "--node-index", str(index - 1), "--nodes", "2",
    )  # fmt: skip
    admit = _admit_line(printed)
    admit[admit.index("FEDERATION_DIR")] = str(federation)
    admit[admit.index("--out") + 1] = str(home / "state" / "federation.cert")
    _cli(*admit)
    (home / "turn.toml").write_text(f'username = "{TURN_USER}"\ncredential = "{TURN_SECRET}"\n')
    (home / "turn.toml").chmod(0o600)
    text = config.read_text()
    text = _edit(text, 'runtime_dir = "/run/p2pfl"', f'runtime_dir = "{home / "run"}"')
    text = _edit(text, "mdns = true", "mdns = false")  # other sites: mDNS does not reach them
    text = _edit(text, "static_peers = []", f'static_peers = ["{peer}:{SIGNALING_PORT}"]')
    text = _edit(text, 'listen_host = "0.0.0.0"', f'listen_host = "{address}"')
    text = _edit(
        text,
        "ice_servers = []",
        f'ice_servers = ["turn:{turn}:{TURN_PORT}?transport=udp"]\nice_credentials = "turn.toml"',
    )
    text = _edit(text, 'ice_transport_policy = "all"', 'ice_transport_policy = "relay"')
    text = _edit(text, "period = 5.0", "period = 1.0")
    config.write_text(text)
    _cli("run", "--check", "--config", str(config))
    return Site(index, address, config, home / "daemon.log")


@pytest.fixture
def network() -> Iterator[BridgedNetwork]:
    with BridgedNetwork(3) as net:
        yield net


def _refuse_udp_between(net: BridgedNetwork, a: int, b: int) -> None:
    """Each node's routing refuses UDP to the other (no iptables here: `ip rule ipproto`)."""
    for x, y in ((a, b), (b, a)):
        rule = ["ip", "rule", "add", "to", net.addresses[y], "ipproto", "udp", "prohibit"]
        done = subprocess.run(net.command(x, rule), capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(rule)}: {done.stderr}"
    # The rule is in force: a datagram to the other node is refused at once.
    with (
        net.enter(a),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe,
        pytest.raises(PermissionError),
    ):
        probe.sendto(b"x", (net.addresses[b], 9))


def _start_turn(
    command: list[str],
    address: str,
    workdir: Path,
    inside: Callable[[], contextlib.AbstractContextManager[None]],
) -> subprocess.Popen[bytes]:
    """coturn on ``address`` (``command``: the prefix that runs it in its namespace); returns
    once it accepts connections from ``inside()`` (a namespace its clients live in)."""
    assert TURNSERVER is not None
    workdir.mkdir()
    argv = [
        TURNSERVER, "--listening-ip", address, "--relay-ip", address,
        "--listening-port", str(TURN_PORT), "--lt-cred-mech",
        "--user", f"{TURN_USER}:{TURN_SECRET}", "--realm", "p2pfl.test",
        # Relay to relay: both nodes' peers are relay addresses on this server itself.
        "--allowed-peer-ip", address,
        "--no-cli", "--no-tls", "--no-dtls",
        "--db", str(workdir / "turndb"), "--pidfile", str(workdir / "turn.pid"),
        "--log-file", "stdout", "--verbose",
    ]  # fmt: skip
    with (workdir / "turn.log").open("wb") as log:
        process = subprocess.Popen([*command, *argv], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # TURN also listens on TCP: ready when that accepts
        assert process.poll() is None, f"turnserver exited: {_tail(workdir / 'turn.log')}"
        try:
            with inside():
                socket.create_connection((address, TURN_PORT), timeout=1).close()
        except OSError:
            time.sleep(0.2)
        else:
            return process
    raise AssertionError(f"turnserver did not start: {_tail(workdir / 'turn.log')}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _peers(site: Site) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "peers", "--json", "--config", str(site.config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if done.returncode != 0:
        return []
    peers: list[dict[str, Any]] = json.loads(done.stdout)
    return peers


def _status(site: Site) -> dict[str, Any] | None:
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "status", "--json", "--config", str(site.config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if done.returncode != 0:
        return None
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def _wait_for(sites: list[Site], condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for site in sites:
            if site.process is not None and site.process.poll() is not None:
                pytest.fail(f"{site.config.parent.name} exited:\n{_tail(site.log)}")
        time.sleep(0.5)
    logs = "\n".join(f"--- {s.config.parent.name}\n{_tail(s.log)}" for s in sites)
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def test_two_sites_without_a_direct_path_learn_through_a_turn_relay(
    network: BridgedNetwork, short_tmp: Path
) -> None:
    turn, a, b = network.addresses
    _refuse_udp_between(network, 1, 2)
    turn_process = _start_turn(
        network.command(0, []), turn, short_tmp / "turn", lambda: network.enter(1)
    )
    federation = short_tmp / "federation"
    _cli("federation", "init", "--dir", str(federation))
    sites = [
        _set_up_site(short_tmp, "site-a", 1, a, b, turn, federation),
        _set_up_site(short_tmp, "site-b", 2, b, a, turn, federation),
    ]
    try:
        for site in sites:
            with site.log.open("wb") as log:
                site.process = subprocess.Popen(
                    network.command(
                        site.index, [sys.executable, "-m", "p2pfl", "run", "--config",
                                     str(site.config)],
                    ),
                    stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip

        def learning_through_the_relay() -> bool:
            for site in sites:
                status = _status(site)
                peers = [p for p in _peers(site) if p["state"] == "connected"]
                if status is None or len(peers) != 1:
                    return False
                (peer,) = peers
                # Models travelled over this link (a digits model is tens of KB), were
                # accepted, and the node's own model is a good one.
                if not (
                    peer["ice_path"] == "relayed"
                    and peer["bytes_in"] > 200_000
                    and status["rejected"] == {}
                    and status["round"] >= 5
                    and (status["metric_value"] or 0) >= 0.8
                ):
                    return False
            return True

        _wait_for(sites, learning_through_the_relay, 180, "two nodes learning over the relay")
        for site in sites:
            (peer,) = _peers(site)
            # The peer's end of the pair in use is an address on the TURN server.
            assert peer["address"].rpartition(":")[0] == turn
            table = _cli("peers", "--config", str(site.config))
            assert "relayed" in table and turn in table
    finally:
        for site in sites:
            if site.process is not None and site.process.poll() is None:
                site.process.terminate()
        codes = [s.process.wait(timeout=60) if s.process else None for s in sites]
        turn_process.terminate()
        turn_process.wait(timeout=20)
    assert codes == [0, 0], "\n".join(_tail(s.log) for s in sites)
    # The TURN server saw both nodes allocate relays with the configured credentials.
    assert TURN_USER in (short_tmp / "turn" / "turn.log").read_text(errors="replace")


async def _offer_candidates(settings: LinkSettings) -> list[str]:
    """The ICE candidate lines of the offer a link with ``settings`` makes."""
    async with open_bridge() as bridge:

        async def offer() -> str:
            link = RtcLink(settings, on_message=print, on_down=lambda _r: None, on_drop=print)
            try:
                return await link.create_offer()
            finally:
                await link.close()

        with trio.fail_after(30):
            sdp = await bridge.call(offer)
    return [line for line in sdp.splitlines() if line.startswith("a=candidate")]


async def test_relay_policy_offers_only_the_turn_servers_relay_address(
    short_tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datachannel, "_turn_warned_at", -math.inf)
    with SharedNetwork(2) as net:
        turn, node = net.addresses
        process = _start_turn(net.command([]), turn, short_tmp / "turn", net.enter)
        try:
            with net.enter():
                settings = LinkSettings(
                    ice_servers=(f"turn:{turn}:{TURN_PORT}?transport=udp",),
                    turn_username=TURN_USER,
                    turn_credential=TURN_SECRET,
                )
                every = await _offer_candidates(settings)
                relay = await _offer_candidates(dataclasses.replace(settings, relay_only=True))
                assert "no relay address" not in caplog.text
                refused = await _offer_candidates(
                    dataclasses.replace(settings, turn_credential="wrong", relay_only=True)
                )
        finally:
            process.terminate()
            process.wait(timeout=20)
    # "all": the node's own addresses and a relay on the TURN server; "relay": only the relay,
    # which does not give the node's address away either (raddr 0.0.0.0).
    assert any(" typ host" in c and f" {node} " in c for c in every)
    assert any(" typ relay" in c for c in every)
    assert relay and all(f" {turn} " in c and " typ relay raddr 0.0.0.0 " in c for c in relay)
    # Refused credentials: no candidate at all, and the log says why.
    assert refused == []
    assert "the TURN server gave this link no relay address" in caplog.text
    assert "no link can open" in caplog.text
