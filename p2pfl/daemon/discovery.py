"""Finding peers: a zeroconf advert ``_p2pfl._udp.local.``, a browser, and static peers.

The advert's TXT record carries the node id, public key (hex), signaling port, protocol version
and federation id. It is *not* trusted: anyone on the LAN can publish anything, so a candidate is
only a hint where to knock; identity is proven in signaling. Adverts that are malformed, name a
key that does not match the id, speak another protocol version or another federation are dropped
with a counted reason. mDNS records of a dead node live on in caches for a long time, so
liveness comes from the transport's heartbeats, never from here.

AsyncZeroconf runs on the node's asyncio bridge loop; its callbacks reach trio only as
``PeerCandidate`` values sent into a trio memory channel (``AsyncioBridge.to_trio`` schedules the
non-blocking ``send_nowait`` on the trio loop; a full channel drops with a counted reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from p2pfl.daemon.bridge import AsyncioBridge
from p2pfl.identity import node_id_for

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Advert",
    "DiscoveryError",
    "MdnsDiscovery",
    "PeerCandidate",
    "open_mdns_discovery",
    "parse_advert",
    "parse_static_peer",
]

SERVICE_TYPE = "_p2pfl._udp.local."
PROTOCOL_VERSION = 1
_RESOLVE_TIMEOUT_MS = 3000


class DiscoveryError(ValueError):
    """A malformed advert or static peer entry; ``reason`` is a short slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Advert:
    """What this node announces."""

    node_id: str
    public_key: bytes
    host: str  # the address peers should use; "0.0.0.0" means every local IPv4 address
    signaling_port: int
    federation_id: str | None = None
    protocol_version: int = PROTOCOL_VERSION

    def properties(self) -> dict[str, str]:
        return {
            "id": self.node_id,
            "pk": self.public_key.hex(),
            "port": str(self.signaling_port),
            "v": str(self.protocol_version),
            "fed": self.federation_id or "",
        }


@dataclass(frozen=True, slots=True)
class PeerCandidate:
    """Where a peer might be reached. ``node_id``/``public_key`` are None for a static peer
    until signaling has proven who answers there."""

    host: str
    port: int
    node_id: str | None = None
    public_key: bytes | None = None
    source: str = "mdns"  # "mdns" | "static" | "invite"


def parse_advert(
    properties: dict[bytes, bytes | None], host: str, federation_id: str | None
) -> PeerCandidate:
    """Check an advert's TXT record; raise DiscoveryError(reason) when it is unusable."""

    def text(key: bytes) -> str:
        value = properties.get(key)
        if value is None:
            raise DiscoveryError("missing_field", f"advert has no {key.decode()!r} field")
        try:
            return value.decode("ascii")
        except UnicodeDecodeError as exc:
            raise DiscoveryError("malformed", f"advert field {key.decode()!r} not ASCII") from exc

    node_id, key_hex, port_text, version = text(b"id"), text(b"pk"), text(b"port"), text(b"v")
    fed = properties.get(b"fed") or b""
    try:
        public_key = bytes.fromhex(key_hex)
        port = int(port_text)
    except ValueError as exc:
        raise DiscoveryError("malformed", f"advert key or port unreadable: {exc}") from exc
    if len(public_key) != 32:
        raise DiscoveryError("malformed", "advert public key is not 32 bytes")
    if node_id_for(public_key) != node_id:
        raise DiscoveryError("id_key_mismatch", f"advert id {node_id[:8]} does not match its key")
    if not 0 < port < 65536:
        raise DiscoveryError("malformed", f"advert port {port} out of range")
    if version != str(PROTOCOL_VERSION):
        raise DiscoveryError("version_mismatch", f"advert speaks protocol {version!r}")
    if federation_id is not None and fed.decode("ascii", "replace") != federation_id:
        raise DiscoveryError("other_federation", f"advert of {node_id[:8]} is another federation")
    return PeerCandidate(host, port, node_id, public_key, "mdns")


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
    """An advert plus a browser on the asyncio bridge loop; candidates arrive on ``candidates``."""

    def __init__(
        self,
        bridge: AsyncioBridge,
        advert: Advert,
        send: trio.MemorySendChannel[PeerCandidate],
        counters: Counter[str],
    ) -> None:
        self._bridge = bridge
        self._advert = advert
        self._send = send
        self.counters = counters
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: set[asyncio.Task[None]] = set()

    def _addresses(self) -> list[str]:
        if self._advert.host in ("0.0.0.0", ""):
            return _local_ipv4_addresses()
        return [self._advert.host]

    async def _start(self) -> None:
        addresses = self._addresses()
        if not addresses:
            raise DiscoveryError("no_address", "no IPv4 address to advertise on; check the host")
        interfaces: list[str] | None = None if self._advert.host in ("0.0.0.0", "") else addresses
        if interfaces is None:
            self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        else:
            self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        advert = self._advert
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{advert.node_id}.{SERVICE_TYPE}",
            port=advert.signaling_port,
            properties=advert.properties(),
            server=f"p2pfl-{advert.node_id}.local.",
            addresses=[socket.inet_aton(a) for a in addresses],
        )
        # Registration returns an awaitable that must itself be awaited (else no announcement).
        await (await self._zc.async_register_service(self._info))
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return  # liveness is the transport's business
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None or name == f"{self._advert.node_id}.{SERVICE_TYPE}":
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, _RESOLVE_TIMEOUT_MS):
            self._bridge.to_trio(self._count, "unresolved_advert")
            return
        hosts = info.parsed_addresses(IPVersion.V4Only)
        if not hosts or not info.port:
            self._bridge.to_trio(self._count, "advert_without_address")
            return
        try:
            candidate = parse_advert(info.properties, hosts[0], self._advert.federation_id)
        except DiscoveryError as exc:
            self._bridge.to_trio(self._count, f"advert_{exc.reason}")
            return
        if candidate.node_id != self._advert.node_id:
            self._bridge.to_trio(self._deliver, candidate)

    def _count(self, reason: str) -> None:
        self.counters[reason] += 1

    def _deliver(self, candidate: PeerCandidate) -> None:
        try:
            self._send.send_nowait(candidate)
        except trio.WouldBlock:
            self.counters["candidate_channel_full"] += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _stop(self) -> None:
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
    advert: Advert,
    send: trio.MemorySendChannel[PeerCandidate],
    counters: Counter[str] | None = None,
) -> AsyncIterator[MdnsDiscovery]:
    """Advertise ``advert`` and browse for peers until the block exits (goodbye sent on exit)."""
    discovery = MdnsDiscovery(bridge, advert, send, counters if counters is not None else Counter())
    await bridge.call(discovery._start)
    try:
        yield discovery
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await bridge.call(discovery._stop)
