"""Finding peers: a signed zeroconf advert ``_p2pfl._udp.local.``, a browser, and static peers.

Anyone on the LAN can publish anything over mDNS, so every advert is signed by the node key and
checked before its candidate reaches the transport (``p2pfl.daemon.adverts`` defines the TXT
layout and the checks). What is guaranteed for each ``PeerCandidate`` delivered here:

- its node id is the hash of its public key, and that key signed the address, port, federation
  id, protocol version and lifetime (``Domain.DISCOVERY``); the candidate's address is one of
  the signed ones, and mDNS served the advert at a signed address and the signed port;
- the advert is unexpired (an hour of validity; this node re-signs its own every 15 minutes, so
  long-running daemons stay discoverable) and not issued more than 5 minutes in the future;
- it is of our federation and, in federation or allowlist mode, of a member: adverts carry the
  node's membership certificate, so non-members are never dialled;
- no newer advert of the same node was accepted before: a replayed older advert (an old address
  of a member) never overrides a newer one.

Everything else is dropped and counted in the ``DropLog`` under stage ``discovery`` with its
reason (``unsigned``, ``bad_signature``, ``expired``, ``from_future``, ``address_mismatch``,
``other_federation``, ``id_key_mismatch``, ``replayed``, ``malformed``, a trust reason such as
``missing_certificate``, ...; ``unresolved`` when the record could not be fetched in 3 s). A
valid advert is still only a hint where to knock: identity is proven again in signaling, which
binds the data channel to the key. mDNS records of a dead node live on in caches for a long
time, so liveness comes from the transport's heartbeats, never from here.

AsyncZeroconf runs on the node's asyncio bridge loop; its callbacks only resolve the service and
hand the raw record to trio (``AsyncioBridge.to_trio``), where it is verified, counted and, if
good, sent into a trio memory channel (a full channel counts
``resource/candidate_channel_full``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import trio

from p2pfl.daemon.adverts import (
    ADVERT_REFRESH_S,
    MAX_ADVERT_ADDRESSES,
    PROTOCOL_VERSION,
    Advert,
    AdvertVerifier,
    DiscoveryError,
    PeerCandidate,
    ResolvedAdvert,
)
from p2pfl.daemon.bridge import AsyncioBridge
from p2pfl.daemon.drops import DropLog
from p2pfl.identity import NodeIdentity
from p2pfl.trust import TrustPolicy

if TYPE_CHECKING:  # zeroconf is imported when mDNS starts: a node with mdns = false never loads it
    from zeroconf import ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Advert",
    "DiscoveryError",
    "MdnsDiscovery",
    "PeerCandidate",
    "open_mdns_discovery",
    "parse_static_peer",
]

SERVICE_TYPE = "_p2pfl._udp.local."
_RESOLVE_TIMEOUT_MS = 3000
log = logging.getLogger(__name__)


def parse_static_peer(entry: str) -> PeerCandidate:
    """``"host:port"`` (IPv4 or a name) -> candidate; the error says what a good entry is."""
    host, sep, port_text = entry.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not sep or not host or not 0 < port < 65536:
        raise DiscoveryError(
            "bad_static_peer",
            f"static peer {entry!r} must be HOST:PORT with the peer's signaling port, "
            "e.g. 10.0.0.7:7470",
        )
    return PeerCandidate(host.strip("[]"), port, source="static")


def _local_ipv4_addresses() -> list[str]:
    import ifaddr  # zeroconf's own dependency

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return found


class MdnsDiscovery:
    """A signed advert plus a browser on the asyncio bridge loop; verified candidates go to
    ``send``, everything refused is counted in ``drops`` (stage ``discovery``)."""

    def __init__(
        self,
        bridge: AsyncioBridge,
        identity: NodeIdentity,
        advert: Advert,
        send: trio.MemorySendChannel[PeerCandidate],
        *,
        current_trust: Callable[[], TrustPolicy],
        drops: DropLog,
    ) -> None:
        self._bridge = bridge
        self._identity = identity
        self._advert = advert
        self._send = send
        self.drops = drops
        self._current_trust = current_trust  # followed, so a reloaded allowlist applies at once
        self.verifier = AdvertVerifier(identity.node_id, current_trust())
        self._name = f"{identity.node_id}.{SERVICE_TYPE}"
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._addresses: list[str] = []
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: set[asyncio.Task[None]] = set()
        self._stopped = False

    def _local_addresses(self) -> list[str]:
        if self._advert.host not in ("0.0.0.0", ""):
            return [self._advert.host]
        found = _local_ipv4_addresses()
        if len(found) > MAX_ADVERT_ADDRESSES:
            log.warning(
                "advertising only the first %d of %d local IPv4 addresses; set "
                "[discovery] listen_host or interface to choose one",
                MAX_ADVERT_ADDRESSES,
                len(found),
            )
        return found[:MAX_ADVERT_ADDRESSES]

    def _service_info(self) -> AsyncServiceInfo:
        """Our service record with a freshly signed TXT (the A records are the signed set)."""
        from zeroconf.asyncio import AsyncServiceInfo

        return AsyncServiceInfo(
            SERVICE_TYPE,
            self._name,
            port=self._advert.signaling_port,
            properties=self._advert.properties(self._identity, self._addresses, time.time()),
            server=f"p2pfl-{self._identity.node_id}.local.",
            addresses=[socket.inet_aton(a) for a in self._addresses],
        )

    async def _start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self._addresses = addresses = self._local_addresses()
        if not addresses:
            raise DiscoveryError("no_address", "no IPv4 address to advertise on; check the host")
        if self._advert.host in ("0.0.0.0", ""):
            self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        else:
            self._zc = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        self._info = self._service_info()
        # Registration returns an awaitable that must itself be awaited (else no announcement).
        await (await self._zc.async_register_service(self._info))
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    async def _refresh(self) -> None:
        """Re-sign the advert (new issue and expiry times, the host's addresses now) and
        announce the update."""
        if self._zc is None or self._stopped:
            return
        self._addresses = self._local_addresses() or self._addresses
        self._info = self._service_info()
        await (await self._zc.async_update_service(self._info))

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed or name == self._name:
            return  # liveness is the transport's business; our own advert is no candidate
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolved)

    def _resolved(self, task: asyncio.Task[None]) -> None:
        """Done-callback: a resolution that failed (whatever an advert provoked) is counted."""
        self._resolving.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            reason = f"error_{type(exc).__name__}"
            self._bridge.to_trio(self.drops.count, "discovery", reason, None)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, _RESOLVE_TIMEOUT_MS):
            self._bridge.to_trio(self.drops.count, "discovery", "unresolved", None)
            return
        resolved = ResolvedAdvert(
            dict(info.properties), tuple(info.parsed_addresses(IPVersion.V4Only)), info.port or 0
        )
        self._bridge.to_trio(self._receive, resolved)

    def _receive(self, resolved: ResolvedAdvert) -> None:
        """On the trio thread: verify, count a refusal, or deliver the candidate."""
        try:
            self.verifier.trust = self._current_trust()
            candidate = self.verifier.check(resolved, time.time())
        except DiscoveryError as exc:
            self.drops.count("discovery", exc.reason, exc.peer)
            log.debug("advert dropped (%s): %s", exc.reason, exc)
            return
        except Exception as exc:  # runs as a trio callback: nothing may escape
            self.drops.count("discovery", f"error_{type(exc).__name__}")
            log.warning("advert check failed: %r", exc)
            return
        try:
            self._send.send_nowait(candidate)
        except trio.WouldBlock:
            self.drops.count("resource", "candidate_channel_full", candidate.node_id)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _stop(self) -> None:
        self._stopped = True
        for task in list(self._resolving):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                # Awaiting the inner awaitable is what sends the goodbye packets.
                with contextlib.suppress(Exception):
                    await (await self._zc.async_unregister_service(self._info))
            await self._zc.async_close()


@contextlib.asynccontextmanager
async def open_mdns_discovery(
    bridge: AsyncioBridge,
    identity: NodeIdentity,
    advert: Advert,
    send: trio.MemorySendChannel[PeerCandidate],
    *,
    current_trust: Callable[[], TrustPolicy],
    drops: DropLog,
    refresh_s: float = ADVERT_REFRESH_S,
) -> AsyncIterator[MdnsDiscovery]:
    """Advertise ``advert`` signed by ``identity`` and browse for peers until the block exits.

    Adverts are checked against the policy ``current_trust()`` returns at that moment. The
    advert is re-signed every ``refresh_s`` seconds; the goodbye is sent on exit.
    """
    discovery = MdnsDiscovery(
        bridge, identity, advert, send, current_trust=current_trust, drops=drops
    )
    await bridge.call(discovery._start)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_keep_fresh, bridge, discovery, refresh_s)
            yield discovery
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await bridge.call(discovery._stop)


async def _keep_fresh(bridge: AsyncioBridge, discovery: MdnsDiscovery, refresh_s: float) -> None:
    while True:
        await trio.sleep(refresh_s)
        try:
            await bridge.call(discovery._refresh)
        except Exception as exc:  # a failed refresh must not end discovery; the next one retries
            log.warning("could not refresh the mDNS advert: %s", exc)
