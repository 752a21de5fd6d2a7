"""The daemon's TOML configuration, read into typed, frozen dataclasses.

Every table and key is declared here; anything else in the file is an error. Errors name the file,
the line, the key and what to do, because an operator reading ``journalctl`` has nothing else to go
on. ``tomllib`` reports no positions for values, so :func:`locate` finds the line by scanning the
file text for the table header and the key (plain, quoted and dotted keys, inline tables are found
at their parent key).

Relative paths in the file are resolved against the file's directory, so a configuration and the
files it names can move together. Directories left unset fall back to what systemd hands us
(``$STATE_DIRECTORY``, ``$RUNTIME_DIRECTORY``) and then to per-user defaults.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from p2pfl.learning.setup import DAEMON_PLACES, PARAMETER_KEYS, LearningSetup, from_daemon
from p2pfl.ml.catalog import partition_problem
from p2pfl.tomlkeys import locate

EXIT_CONFIG = 2
"""Exit status for a configuration the daemon cannot run with (systemd: do not restart)."""

TrustModeName = Literal["federation", "allowlist", "open"]
PartitionName = Literal["iid", "dirichlet", "quantity"]  # ml.partition.PARTITIONERS
IcePolicyName = Literal["all", "relay"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["logfmt", "json"]
ParamValue = str | int | float | bool


class ConfigError(Exception):
    """A configuration problem, with where it is and how to fix it."""

    def __init__(
        self, message: str, *, file: Path | None = None, line: int | None = None, key: str = ""
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        where = str(file) if file is not None else "configuration"
        if line is not None:
            where += f":{line}"
        prefix = f"{where}: {key}: " if key else f"{where}: "
        super().__init__(prefix + message)


@dataclass(frozen=True, slots=True)
class NodeSection:
    name: str = ""
    state_dir: Path | None = None
    runtime_dir: Path | None = None
    position: tuple[float, ...] = ()
    """[lat, lon] in degrees: where this node is, for [protocol] neighbours = "range"."""


@dataclass(frozen=True, slots=True)
class TrustSection:
    mode: TrustModeName = "federation"
    federation_public_key: str = ""
    certificate: Path | None = None
    allowlist: Path | None = None
    revocations: Path | None = None  # a revocation list from `p2pfl federation revoke`


@dataclass(frozen=True, slots=True)
class DiscoverySection:
    mdns: bool = True
    interface: str = ""
    static_peers: tuple[str, ...] = ()
    listen_host: str = "0.0.0.0"
    signaling_port: int = 0
    ice_servers: tuple[str, ...] = ()
    """STUN/TURN URLs: at most one "stun:" and one "turn:"/"turns:" (aiortc uses one of each)."""
    ice_credentials: Path | None = None
    """A TOML file with the TURN server's ``username`` and ``credential``: a secret, so it lives
    in its own file, not readable by other users, rather than in this one."""
    ice_transport_policy: IcePolicyName = "all"
    """"relay": use TURN relayed candidates only (every packet through the TURN server)."""
    path_mtu: int = 1500


def _default_setup() -> LearningSetup:
    return LearningSetup.model_validate({"protocol": "gossip"})


@dataclass(frozen=True, slots=True)
class ProtocolSection:
    """[protocol]: the learning setup (``p2pfl.learning.setup``: protocol ``name``, aggregation,
    codec, neighbours, range_km, max_norm; the protocol's and the rule's parameters under
    [protocol.params]; the budget is [task] epochs) and the daemon's own keys below."""

    setup: LearningSetup = field(default_factory=_default_setup)
    seed: int = 0
    start_peers: int = 0
    """Start learning once this many peers are connected (or ``start_timeout_s`` passed), for
    every protocol: FedAvg then elects the smallest id among all of them rather than among the
    first to connect, and server-free does not close its first rounds alone."""
    start_timeout_s: float = 30.0
    neighbour_ids: tuple[str, ...] = ()
    """For neighbours = "topology": the node ids this node exchanges with."""
    positions: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Node id -> [lat, lon] of the other members, for neighbours = "range". Configuration, not
    claims from the network: a peer cannot move itself into range, and a peer not listed here is
    never in range."""

    @property
    def name(self) -> str:
        return self.setup.protocol

    @property
    def aggregation(self) -> str | None:
        return self.setup.aggregation

    @property
    def codec(self) -> str:
        return self.setup.codec

    @property
    def neighbours(self) -> str:
        return self.setup.neighbours

    @property
    def range_km(self) -> float | None:
        return self.setup.range_km

    @property
    def params(self) -> dict[str, Any]:
        return self.setup.params()


@dataclass(frozen=True, slots=True)
class TaskSection:
    name: str = "digits"
    data: Path | None = None
    partition: PartitionName = "iid"
    alpha: float = 0.5
    node_index: int = 0
    n_nodes: int = 1
    seed: int = 0
    lr: float | None = None
    batch_size: int | None = None
    node_ids: tuple[str, ...] = ()
    """Graph tasks: the node id of every partition, by index, so halo features can be asked
    of their owners; empty: no exchange (the halo stays masked). A graph task's daemon holds
    its own sensors' readings only (``data`` may be the file `p2pfl data split` wrote for it)."""
    features_timeout_s: float = 30.0
    """Graph tasks: how long learning waits for the halo's owners; those that have not answered
    by then leave their sensors masked (``p2pfl status`` lists them)."""
    options: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DataSection:
    replay_speed: float = 0.0
    """Graph tasks: replay the readings from the test split on at this many 5-minute steps per
    second, pushing each new step to the subscribed cloudlets and forecasting live
    (``p2pfl.daemon.live``); 0: off."""


@dataclass(frozen=True, slots=True)
class ExecutorSection:
    device: str = "cpu"
    threads: int = 1
    mode: Literal["process", "thread"] = "thread"


@dataclass(frozen=True, slots=True)
class LimitsSection:
    max_message_mb: float = 64.0
    peer_timeout_s: float = 8.0
    transfer_timeout_s: float = 30.0
    stop_timeout_s: float = 20.0
    max_clock_skew_s: float = 60.0
    # What a stranger can make the daemon spend (see daemon/README.md, "Threat model").
    signaling_connections: int = 64
    signaling_per_source: int = 8
    signaling_read_timeout_s: float = 5.0
    pending_links: int = 32
    shed_fraction: float = 0.9


@dataclass(frozen=True, slots=True)
class LoggingSection:
    level: LogLevel = "info"
    format: LogFormat = "logfmt"
    file: Path | None = None  # also append the log here (`p2pfl logs` reads it); None: stderr only


@dataclass(frozen=True, slots=True)
class MetricsSection:
    prometheus: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class CheckpointsSection:
    keep: int = 3
    interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    trust: TrustSection = field(default_factory=TrustSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    protocol: ProtocolSection = field(default_factory=ProtocolSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataSection = field(default_factory=DataSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    checkpoints: CheckpointsSection = field(default_factory=CheckpointsSection)
    source: ConfigSource | None = field(default=None, compare=False, repr=False)

    @property
    def state_dir(self) -> Path:
        return self.node.state_dir or default_state_dir()

    @property
    def runtime_dir(self) -> Path:
        return self.node.runtime_dir or default_runtime_dir()

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / CONTROL_SOCKET_NAME

    def error(self, key_path: str, message: str) -> ConfigError:
        """A ConfigError for ``key_path`` (e.g. "protocol.params.period_s") found after loading."""
        if self.source is None:
            return ConfigError(message, key=key_path)
        return self.source.error(key_path, message)


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """The file a Config came from, kept so later checks can still point at a line."""

    path: Path
    text: str

    def error(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(
            message, file=self.path, line=locate(self.text, key_path.split(".")), key=key_path
        )


CONTROL_SOCKET_NAME = "control.sock"

# Constraints beyond the type, checked per key: (predicate, what is expected).
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "discovery.signaling_port": (lambda v: 0 <= v <= 65535, "a port number 0..65535 (0: any)"),
    "discovery.path_mtu": (lambda v: v >= 1280, "a packet size in bytes >= 1280 (IPv6's minimum)"),
    "metrics.port": (lambda v: 1 <= v <= 65535, "a port number 1..65535"),
    "task.alpha": (lambda v: v > 0, "a number > 0"),
    "task.n_nodes": (lambda v: v >= 1, "an integer >= 1"),
    "task.node_index": (lambda v: v >= 0, "an integer >= 0"),
    "task.lr": (lambda v: v > 0, "a number > 0"),
    "task.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "task.features_timeout_s": (lambda v: v >= 0, "a number of seconds >= 0"),
    "data.replay_speed": (
        lambda v: 0 <= v <= 1e4,
        "a number of 5-minute steps per second, 0 (off) to 10000",
    ),
    "protocol.start_peers": (lambda v: v >= 0, "an integer >= 0"),
    "protocol.start_timeout_s": (lambda v: v >= 0, "a number of seconds >= 0"),
    "executor.threads": (lambda v: v >= 1, "an integer >= 1"),
    "limits.max_message_mb": (lambda v: v > 0, "a number > 0"),
    "limits.peer_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "limits.transfer_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "limits.stop_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "limits.max_clock_skew_s": (lambda v: v > 0, "a number of seconds > 0"),
    "limits.signaling_connections": (lambda v: v >= 1, "an integer >= 1"),
    "limits.signaling_per_source": (lambda v: v >= 1, "an integer >= 1"),
    "limits.signaling_read_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "limits.pending_links": (lambda v: v >= 1, "an integer >= 1"),
    "limits.shed_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "checkpoints.keep": (lambda v: v >= 1, "an integer >= 1"),
    "checkpoints.interval_s": (lambda v: v > 0, "a number of seconds > 0"),
}


def default_state_dir() -> Path:
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/p2pfl")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "p2pfl"


def default_runtime_dir() -> Path:
    if env := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/p2pfl")
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "p2pfl"
    return Path(f"/tmp/p2pfl-{os.geteuid()}")


def default_control_socket() -> Path:
    if env := os.environ.get("P2PFL_SOCKET"):
        return Path(env)
    return default_runtime_dir() / CONTROL_SOCKET_NAME


def load_config(path: Path) -> Config:
    """Read and check ``path``; raise ConfigError naming the file, line and key on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file; pass an existing file with --config", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read it: {exc}", file=path) from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=path) from None
    source = ConfigSource(path=path, text=text)
    base = path.resolve().parent
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        section_type = _SECTIONS.get(name)
        if section_type is None:
            raise source.error(name, f"unknown table; known tables: {', '.join(_SECTIONS)}")
        if not isinstance(value, dict):
            raise source.error(name, f"must be a table ([{name}]), not a {_toml_type(value)}")
    setup = _read_setup(raw, source)
    for name, value in raw.items():
        sections[name] = _build_section(_SECTIONS[name], value, name, source, base)
    sections["protocol"] = dataclasses.replace(
        sections.get("protocol", ProtocolSection()), setup=setup
    )
    config = Config(**sections, source=source)
    _check_cross_fields(config)
    return config


_SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Config).items() if name != "source"
}


def _read_setup(raw: dict[str, Any], source: ConfigSource) -> LearningSetup:
    """The learning setup from its keys in [protocol], [protocol.params] and [task] (which are
    taken out of ``raw``: the sections keep only their own keys), by the setup's validator."""
    tables = {name: raw.get(name, {}) for name in ("protocol", "task", "limits")}
    params = tables["protocol"].pop("params", {})
    if not isinstance(params, dict):
        raise source.error("protocol.params", f"must be a table, not a {_toml_type(params)}")
    taken: dict[str, dict[str, Any]] = {"protocol": {}, "task": {}, "limits": {}}
    for place in DAEMON_PLACES.values():
        table, _, name = place.rpartition(".")
        if table in taken and name in tables[table]:
            taken[table][name] = tables[table].pop(name)
    setup, key, problem = from_daemon(taken["protocol"], params, taken["task"], taken["limits"])
    if setup is None:
        raise source.error(key, problem)
    return setup


def _build_section(
    cls: type, raw: dict[str, Any], table: str, source: ConfigSource, base: Path
) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - {"setup"}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        key_path = f"{table}.{key}"
        if table == "protocol" and key in PARAMETER_KEYS:
            raise source.error(
                key_path,
                "a parameter of the protocol or its rule: write it under [protocol.params]",
            )
        if key not in known:
            keys = known | {
                p.rpartition(".")[2] for p in DAEMON_PLACES.values() if p.startswith(f"{table}.")
            }
            raise source.error(
                key_path, f"unknown key; keys of [{table}]: {', '.join(sorted(keys))}"
            )
        try:
            values[key] = _convert(hints[key], value, base)
        except _TypeMismatch as exc:
            raise source.error(
                key_path, f"expected {exc.expected}, got {_describe(value)}"
            ) from None
        check = _CHECKS.get(key_path)
        if check is not None and not check[0](values[key]):
            raise source.error(key_path, f"expected {check[1]}, got {_describe(value)}")
    return cls(**values)


class _TypeMismatch(Exception):
    def __init__(self, expected: str) -> None:
        self.expected = expected


def _convert(hint: Any, value: Any, base: Path) -> Any:
    """Check ``value`` against the annotation ``hint`` and convert it (paths, tuples)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise _TypeMismatch("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _TypeMismatch("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _TypeMismatch("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _TypeMismatch("a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise _TypeMismatch("a path (a non-empty string)")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if origin is Literal:
        if value not in args:
            raise _TypeMismatch("one of " + ", ".join(f'"{a}"' for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if set(non_none) == {str, int, float, bool}:  # ParamValue: any TOML scalar
            if not isinstance(value, str | int | float | bool):
                raise _TypeMismatch("a string, number or boolean")
            return value
        (inner,) = non_none
        return _convert(inner, value, base)
    if origin is tuple:
        if not isinstance(value, list):
            raise _TypeMismatch(f"a list of {_plural(args[0])}")
        try:
            return tuple(_convert(args[0], item, base) for item in value)
        except _TypeMismatch:
            raise _TypeMismatch(f"a list of {_plural(args[0])}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise _TypeMismatch("a table")
        return {str(k): _convert(args[1], v, base) for k, v in value.items()}
    raise TypeError(f"config field type {hint!r} is not supported")


def _plural(hint: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", Path: "paths"}.get(hint, "values")


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _describe(value: Any) -> str:
    shown = repr(value) if not isinstance(value, dict | list) else _toml_type(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{_toml_type(value)} {shown}" if not isinstance(value, dict | list) else shown


def _check_cross_fields(config: Config) -> None:
    if (problem := partition_problem(config.task.name, config.task.partition)) is not None:
        raise config.error("task.partition", problem)
    trust = config.trust
    if trust.mode == "federation" and not _is_hex_key(trust.federation_public_key):
        raise config.error(
            "trust.federation_public_key",
            'trust mode "federation" needs federation_public_key = "<64 hex digits>" (printed by '
            '`p2pfl federation init`), or choose mode = "allowlist" or "open"',
        )
    if trust.mode == "allowlist" and trust.allowlist is None:
        raise config.error(
            "trust.allowlist",
            'trust mode "allowlist" needs allowlist = "PATH" (one public key per line)',
        )
    # Keys of another trust mode would be read and do nothing (a revocation list is signed by
    # the federation key).
    for key, value, mode in (
        ("federation_public_key", trust.federation_public_key, "federation"),
        ("certificate", trust.certificate, "federation"),
        ("revocations", trust.revocations, "federation"),
        ("allowlist", trust.allowlist, "allowlist"),
    ):
        if value and trust.mode != mode:
            raise config.error(
                f"trust.{key}",
                f'applies only to mode = "{mode}" (this node\'s is "{trust.mode}"); remove it '
                "or set that mode",
            )
    try:
        ipaddress.ip_address(config.discovery.listen_host)
    except ValueError:
        raise config.error(
            "discovery.listen_host",
            f'"{config.discovery.listen_host}" is not an IP address (for example "0.0.0.0" for '
            'every interface, or "192.0.2.10")',
        ) from None
    for peer in config.discovery.static_peers:
        host, sep, port = peer.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise config.error(
                "discovery.static_peers",
                f'"{peer}" is not host:port (for example "192.0.2.10:7070" or "[2001:db8::1]:70")',
            )
    _check_ice(config)
    _check_neighbours(config)
    if config.task.node_ids and len(config.task.node_ids) != config.task.n_nodes:
        raise config.error(
            "task.node_ids",
            f"lists {len(config.task.node_ids)} node ids; n_nodes is {config.task.n_nodes}",
        )
    if config.task.node_index >= config.task.n_nodes:
        raise config.error(
            "task.node_index",
            f"node_index {config.task.node_index} must be below n_nodes {config.task.n_nodes}",
        )


_ICE_URL = re.compile(
    r"(?P<scheme>stuns?|turns?):(?P<host>[^?:/\[\]@\s]+)(?::(?P<port>\d{1,5}))?"
    r"(?:\?transport=(?P<transport>udp|tcp))?"
)
_ICE_URL_FORM = (
    'write "stun:HOST[:PORT]", "turn:HOST[:PORT][?transport=udp|tcp]" or '
    '"turns:HOST[:PORT]" (a host name or IPv4 address)'
)


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    """The TURN server's long-term credentials, read from [discovery] ice_credentials."""

    username: str
    credential: str = field(repr=False)


def _ice_url_problem(url: str) -> str | None:
    match = _ICE_URL.fullmatch(url)
    if match is None:
        return f'"{url}" is not a STUN or TURN URL; {_ICE_URL_FORM}'
    scheme, port, transport = match["scheme"], match["port"], match["transport"]
    if scheme == "stuns":
        return f'"{url}": stuns: is not supported by aiortc; use stun: (or a turns: TURN server)'
    if scheme == "stun" and transport is not None:
        return f'"{url}": a stun: URL takes no ?transport; {_ICE_URL_FORM}'
    if scheme == "turns" and transport == "udp":
        return f'"{url}": turns: runs over TCP (TLS) only; remove ?transport=udp'
    if port is not None and not 1 <= int(port) <= 65535:
        return f'"{url}": port {port} is not 1..65535'
    return None


def _check_ice(config: Config) -> None:
    discovery = config.discovery
    turn = [url for url in discovery.ice_servers if url.startswith("turn")]
    for url in discovery.ice_servers:
        if problem := _ice_url_problem(url):
            raise config.error("discovery.ice_servers", problem)
    stun = [url for url in discovery.ice_servers if url.startswith("stun")]
    if len(stun) > 1 or len(turn) > 1:
        raise config.error(
            "discovery.ice_servers",
            "aiortc uses one STUN and one TURN server per connection (it would ignore the rest): "
            "list at most one stun: URL and one turn: or turns: URL",
        )
    if turn and discovery.ice_credentials is None:
        raise config.error(
            "discovery.ice_servers",
            f'"{turn[0]}" needs credentials: ice_credentials = "PATH", a TOML file with '
            'username = "..." and credential = "..." (chmod 600)',
        )
    if discovery.ice_credentials is not None:
        if not turn:
            raise config.error(
                "discovery.ice_credentials",
                "only a TURN server uses credentials: add a turn: URL to ice_servers or remove "
                "this key",
            )
        read_turn_credentials(config)
    if discovery.ice_transport_policy == "relay" and not turn:
        raise config.error(
            "discovery.ice_transport_policy",
            '"relay" uses TURN relayed candidates only: add a turn: URL to ice_servers (with '
            'ice_credentials), or set "all"',
        )


def read_turn_credentials(config: Config) -> TurnCredentials | None:
    """The TURN credentials [discovery] ice_credentials names (None: the key is unset).

    The file holds exactly ``username`` and ``credential`` (strings), is TOML, and must not be
    readable by every user; problems name that file, its line and the key.
    """
    path = config.discovery.ice_credentials
    if path is None:
        return None
    key = "discovery.ice_credentials"
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise config.error(key, f"{path}: no such file; write it (username, credential)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise config.error(key, f"{path}: cannot read it: {exc}") from None
    if mode & 0o004:
        raise config.error(
            key, f"{path} holds the TURN credential and every user can read it: chmod o-r {path}"
        )
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=path) from None
    source = ConfigSource(path=path, text=text)
    for name, value in raw.items():
        if name not in ("username", "credential"):
            raise source.error(name, "unknown key; the keys are username and credential")
        if not isinstance(value, str) or not value:
            raise source.error(name, f"expected a non-empty string, got {_describe(value)}")
    for name in ("username", "credential"):
        if name not in raw:
            raise ConfigError(
                f'{name} is missing; the file needs username = "..." and credential = "..."',
                file=path,
                key=name,
            )
    return TurnCredentials(raw["username"], raw["credential"])


def _position_problem(value: tuple[float, ...]) -> str | None:
    if len(value) != 2:
        return f"expected [latitude, longitude], got a list of {len(value)} numbers"
    lat, lon = value
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return f"[{lat}, {lon}] is not a position: latitude is -90..90, longitude -180..180"
    return None


def _check_neighbours(config: Config) -> None:
    proto = config.protocol
    if config.node.position and (problem := _position_problem(config.node.position)):
        raise config.error("node.position", problem)
    for node_id, position in proto.positions.items():
        if problem := _position_problem(position):
            raise config.error(f"protocol.positions.{node_id}", problem)
    if proto.neighbours == "range":
        if not config.node.position:
            raise config.error(
                "protocol.neighbours",
                'neighbours = "range" needs this node\'s position: [node] position = [lat, lon]',
            )
        if proto.range_km is None:
            raise config.error(
                "protocol.neighbours",
                'neighbours = "range" needs range_km = KM (the distance two nodes can talk over)',
            )
        if not proto.positions:
            raise config.error(
                "protocol.neighbours",
                'neighbours = "range" needs the other members\' positions: [protocol.positions] '
                '"<node id>" = [lat, lon]',
            )
    if proto.neighbour_ids and proto.neighbours != "topology":
        raise config.error(
            "protocol.neighbour_ids",
            'applies only with neighbours = "topology"; remove it or set that',
        )
    if proto.positions and proto.neighbours != "range":
        raise config.error(
            "protocol.positions", 'applies only with neighbours = "range"; remove it or set that'
        )
    if proto.neighbours == "topology" and not proto.neighbour_ids:
        raise config.error(
            "protocol.neighbours",
            'neighbours = "topology" needs neighbour_ids = ["<node id>", ...] (the peers this '
            "node exchanges with)",
        )


def _is_hex_key(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)
