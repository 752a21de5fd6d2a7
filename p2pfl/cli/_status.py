"""`p2pfl status` and `p2pfl peers`: what a running daemon is doing, at a glance.

Talks to the daemon's control socket (found from ``--socket``, ``--config`` or the defaults); a
daemon that is not running is one clear line and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from p2pfl.cli._errors import EXIT_FAILURE, EXIT_USAGE, fail
from p2pfl.daemon.config import default_control_socket
from p2pfl.daemon.control import ControlError, NodeStatus, PeerStatus, fetch_status
from p2pfl.daemon.drops import STAGES
from p2pfl.identity import SHORT_ID_CHARS

if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.table import Table

_SOCKET_HELP = (
    "The daemon's control socket. Default: the one named by --config, else $P2PFL_SOCKET, else "
    "control.sock in the runtime directory ($RUNTIME_DIRECTORY, /run/p2pfl for root, "
    "$XDG_RUNTIME_DIR/p2pfl)."
)
_CONFIG_HELP = "The daemon's configuration file: its runtime directory holds the socket."


def find_socket(socket_path: Path | None, config_path: Path | None) -> Path:
    """The control socket from ``--socket``, ``--config`` or the defaults."""
    if socket_path is not None and config_path is not None:
        raise click.UsageError("give --socket or --config, not both")
    if config_path is not None:
        from p2pfl.daemon.config import ConfigError, load_config

        try:
            socket_path = load_config(config_path).control_socket
        except ConfigError as exc:
            raise fail(str(exc), EXIT_USAGE) from None
    return socket_path or default_control_socket()


def _fetch(socket_path: Path | None, config_path: Path | None) -> NodeStatus:
    return _fetch_from(find_socket(socket_path, config_path))


def _fetch_from(path: Path) -> NodeStatus:
    try:
        return fetch_status(path)
    except ControlError as exc:
        raise fail(str(exc), EXIT_FAILURE) from None


def socket_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help=_CONFIG_HELP,
    )(command)
    return click.option(
        "--socket", "socket_path", type=click.Path(path_type=Path), help=_SOCKET_HELP
    )(command)


@click.command("status")
@socket_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("-w", "--watch", is_flag=True, help="Refresh until Ctrl-C (like `watch`).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
def status(
    socket_path: Path | None, config_path: Path | None, as_json: bool, watch: bool, interval: float
) -> None:
    """Show this node, its model and training, and its peers."""
    path = find_socket(socket_path, config_path)
    node = _fetch_from(path)
    if as_json and not watch:
        click.echo(json.dumps(node.to_json(), indent=2, sort_keys=True))
        return
    if as_json:
        raise click.UsageError("--watch shows the table; for JSON, poll `p2pfl status --json`")
    console = _console()
    if not watch:
        console.print(_status_view(node))
        return
    _watch(console, path, node, interval)


def _watch(console: Console, path: Path, node: NodeStatus, interval: float) -> None:
    """Redraw the status every ``interval`` s until Ctrl-C (the CLI then exits 130, quietly).

    A daemon that goes away is said in place of the status, and watched until it is back. On a
    terminal the view is redrawn in place; piped, each refresh is printed after the last.
    """
    import time

    from rich.console import Group
    from rich.live import Live
    from rich.markup import escape

    def view(node: NodeStatus | None, problem: str | None) -> Group:
        stamp = time.strftime("%H:%M:%S")
        head = f"[dim]{stamp}  every {interval:g} s, Ctrl-C to stop[/]"
        if node is None:
            return Group(head, f"[bold red]{escape(problem or '')}[/]")
        return Group(head, _status_view(node))

    current: NodeStatus | None = node
    problem: str | None = None
    if not console.is_terminal:
        while True:
            console.print(view(current, problem))
            console.print()
            time.sleep(interval)
            current, problem = _try_fetch(path)
    with Live(view(current, problem), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            current, problem = _try_fetch(path)
            live.update(view(current, problem), refresh=True)


def _try_fetch(path: Path) -> tuple[NodeStatus | None, str | None]:
    try:
        return fetch_status(path), None
    except ControlError as exc:
        return None, str(exc)


def _status_view(node: NodeStatus) -> Group:
    from rich.console import Group
    from rich.markup import escape

    parts: list[Any] = [f"[bold red]WARNING: {escape(warning)}[/]" for warning in node.warnings()]
    parts += [_summary(node), ""]
    parts.append(_peer_table(node) if node.peers else _no_peers(node))
    return Group(*parts)


@click.command("peers")
@socket_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def peers(socket_path: Path | None, config_path: Path | None, as_json: bool) -> None:
    """List the daemon's peers: address, ICE path, round-trip time, traffic, drops by stage.

    PATH is how the link travels: host (directly between the nodes' own addresses), server
    reflexive (through a NAT, its address learnt from STUN) or relayed (through a TURN server).
    ADDRESS is the peer's end of that path.
    """
    node = _fetch(socket_path, config_path)
    if as_json:
        click.echo(json.dumps(node.to_json()["peers"], indent=2, sort_keys=True))
        return
    _console().print(_peer_table(node, paths=True) if node.peers else _no_peers(node))


def _no_peers(node: NodeStatus) -> str:
    """Why there are no peers yet, from what the daemon says it is trying."""
    static = node.static_peers or 0
    tried = ["mDNS"] if node.mdns else []
    if static:
        tried.append(f"{static} static peer{'s' * (static != 1)}")
    if tried:
        return f"[yellow]no peers yet[/] (trying {' and '.join(tried)})"
    if node.mdns is None:  # a daemon too old to say
        return "[yellow]no peers yet[/]"
    return (
        "[yellow]no peers[/]: mDNS is off and there are no static peers, so this node looks "
        "for none; set \\[discovery] mdns = true or static_peers, then `systemctl reload p2pfl` "
        "(SIGHUP)"
    )


def _console() -> Console:
    from rich.console import Console

    # Piped output (scripts, `| less`) gets wide lines instead of rich's 80-column default.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _summary(node: NodeStatus) -> str:
    from rich.markup import escape

    name = f"  {escape(node.name)}" if node.name else ""
    lines = [
        f"[bold]node[/]        {node.short_id}{name}   "
        f"[dim](p2pfl {node.version}, pid {node.pid}, up {_duration(node.now - node.started_at)})"
        f"[/]",
        f"[dim]            {node.node_id}[/]",
    ]
    trust = node.trust_mode if node.trust_mode != "open" else "[bold red]OPEN[/]"
    federation = node.federation_id or "-"
    revoked = ""
    if node.revocation_serial is not None:
        revoked = f"   revoked: {node.revoked} (list {node.revocation_serial})"
    lines.append(f"[bold]federation[/]  {federation}   trust: {trust}{revoked}")
    lines.append(f"[bold]protocol[/]    {node.protocol}   task: {node.task}")
    age = (
        f"updated {_duration(node.now - node.model_updated_at)} ago"
        if node.model_updated_at is not None
        else "not trained yet"
    )
    figures = []
    if node.last_loss is not None:
        figures.append(f"loss {node.last_loss:.4g}")
    if node.metric_value is not None:
        figures.append(f"{node.metric_name} {node.metric_value:.4g}")
    lines.append(
        f"[bold]model[/]       round {node.round}, {age}"
        + "; " * bool(figures)
        + ", ".join(figures)
    )
    lines.append(f"[bold]training[/]    {node.training_state}")
    lines.append(f"[bold]traffic[/]     in {_bytes(node.bytes_in)}, out {_bytes(node.bytes_out)}")
    if node.halo is not None:
        lines.append(f"[bold]halo[/]        {_halo(node.halo)}")
    if node.live is not None:
        lines.append(f"[bold]live[/]        {_live(node.live)}")
    if node.sampling is not None:
        sampling = node.sampling
        active = sampling.get("active", [])
        reserved = sampling.get("reserved", [])
        passive = sampling.get("passive", {})
        links = ", ".join(peer[:8] for peer in active) or "none"
        opening = f", {len(reserved)} opening" if reserved else ""
        lines.append(
            f"[bold]active[/]      {len(active)} of max_peers {sampling.get('max_peers')}"
            f"{opening}: {links}"
        )
        members = ", ".join(f"{peer[:8]} (age {age})" for peer, age in passive.items()) or "empty"
        lines.append(
            f"[bold]passive[/]     {len(passive)}: {members}; "
            f"{sampling.get('shuffles', 0)} shuffles"
        )
    dropped = sum(node.drops_by_stage.values())
    if dropped:
        # Per stage here; `--json` has every stage/reason.
        lines.append(f"[bold]dropped[/]     [yellow]{dropped}[/] ({_stages(node.drops_by_stage)})")
    else:
        lines.append("[bold]dropped[/]     0")
    if node.checkpoint is not None:
        ckpt = node.checkpoint
        lines.append(
            f"[bold]checkpoint[/]  #{ckpt.seq}, {_duration(node.now - ckpt.created)} ago, "
            f"sha256 {ckpt.digest[:12]}"
        )
    return "\n".join(lines)


def _halo(halo: dict[str, Any]) -> str:
    """Graph tasks: how much of the halo its owners sent, and what is masked because not."""
    text = f"{halo.get('received_sensors', 0)}/{halo.get('sensors', 0)} sensors from their owners"
    owners = halo.get("owners", {})
    late = sorted(p[:SHORT_ID_CHARS] for p, o in owners.items() if not o.get("received"))
    if late and halo.get("waiting"):
        text += f"; waiting for {', '.join(late)}"
    elif late:
        text += (
            f"; [yellow]{halo.get('masked_sensors', 0)} masked[/] (no readings from "
            f"{', '.join(late)})"
        )
    if halo.get("ignored_sensors"):
        text += f"; {halo['ignored_sensors']} other cloudlets' sensors in its file ignored"
    return text


def _live(live: dict[str, Any]) -> str:
    """Live operation: replay step, rolling forecast MAE, newest halo reading's age per owner."""
    text = f"step {live.get('step')} of {live.get('steps')}"
    if live.get("finished"):
        text += " (replay finished)"
    mae = live.get("mae", {})
    shown = [f"{h} min {v:.2f}" for h, v in mae.items() if v is not None]
    text += "; rolling MAE " + (", ".join(shown) if shown else "-")
    ages = live.get("halo_age_s", {})
    if ages:
        text += "; halo age " + ", ".join(
            f"{p[:SHORT_ID_CHARS]} " + (f"{a:.1f}s" if a is not None else "[yellow]none[/]")
            for p, a in sorted(ages.items())
        )
    if live.get("masked_inputs"):
        text += f"; [yellow]{live['masked_inputs']} halo inputs masked[/]"
    return text


def _peer_table(node: NodeStatus, *, paths: bool = False) -> Table:
    """One row per peer; ``paths`` adds the address and ICE path of each link (`p2pfl peers`)."""
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ["PEER", "NAME", "STATE", "RTT", "IN", "OUT", "LAST SEEN", "DROPPED"]
    if paths:
        columns[3:3] = ["ADDRESS", "PATH"]
    for column in columns:
        table.add_column(column, justify="right" if column in {"RTT", "IN", "OUT"} else "left")
    for peer in sorted(node.peers, key=lambda p: p.node_id):
        where = [peer.address or "-", _path(peer.ice_path)] if paths else []
        table.add_row(
            peer.node_id[:SHORT_ID_CHARS],
            peer.name or "-",
            _state(peer),
            *where,
            f"{peer.rtt_ms:.1f} ms" if peer.rtt_ms is not None else "-",
            _bytes(peer.bytes_in),
            _bytes(peer.bytes_out),
            f"{_duration(node.now - peer.last_seen)} ago"
            if peer.last_seen is not None
            else "never",
            f"[yellow]{_stages(peer.drops)}[/]" if any(peer.drops.values()) else "0",
        )
    return table


def _path(path: str | None) -> str:
    if path is None:
        return "-"
    return f"[yellow]{path}[/]" if path == "relayed" else path


def _stages(by_stage: dict[str, int]) -> str:
    """``envelope 2, link 1``: in the order of the stages, from the outside in."""
    order = {stage: i for i, stage in enumerate(STAGES)}
    items = sorted(by_stage.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    return ", ".join(f"{stage} {n}" for stage, n in items if n)


def _state(peer: PeerStatus) -> str:
    colour = {"connected": "green", "connecting": "yellow", "down": "dim", "refused": "red"}
    return f"[{colour.get(peer.state, 'white')}]{peer.state}[/]"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
