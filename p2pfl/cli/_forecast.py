"""``p2pfl forecast``: the running cloudlet daemon's latest live forecast of its own sensors.

Reads the ``forecast`` command of the control socket (a daemon with ``[data] replay_speed``):
for each own sensor, the speed expected 15, 30 and 60 minutes after the newest replayed step,
with the rolling MAE of earlier forecasts and whether halo inputs were masked (an owner down or
late).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from p2pfl.cli._status import find_socket, socket_options


@click.command("forecast")
@socket_options
@click.option("--sensor", default=None, help="Only this sensor (its id, as in sensors.csv).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def forecast(
    socket_path: Path | None, config_path: Path | None, sensor: str | None, as_json: bool
) -> None:
    """Show the daemon's latest forecast of its own sensors (15/30/60 minutes ahead)."""
    from p2pfl.cli._errors import EXIT_FAILURE, fail
    from p2pfl.daemon.control import ControlError, request

    path = find_socket(socket_path, config_path)
    args: dict[str, Any] = {} if sensor is None else {"sensor": sensor}
    try:
        reply = request(path, "forecast", **args)
    except ControlError as exc:
        raise fail(str(exc), EXIT_FAILURE) from None
    if as_json:
        click.echo(json.dumps(reply, indent=2, sort_keys=True))
        return
    if reply.get("sensors") is None:
        click.echo(f"no forecast yet (replay step {reply.get('step')})")
        return
    horizons = reply["horizons_min"]
    mae = reply.get("mae", {})
    masked = reply.get("masked_inputs", 0)
    click.echo(
        f"step {reply['step']}; halo inputs masked: {masked} of {reply.get('halo_sensors')}"
        + (" (DEGRADED: an owner's readings are missing)" if masked else "")
    )
    click.echo(
        "rolling MAE (mph): "
        + ", ".join(
            f"{h} min {mae[str(h)]:.2f}" if mae.get(str(h)) is not None else f"{h} min -"
            for h in horizons
        )
    )
    click.echo("sensor      " + "".join(f"{h:>4} min " for h in horizons))
    for sid, values in reply["sensors"].items():
        click.echo(f"{sid:<12}" + "".join(f"{v:8.1f} " for v in values))
