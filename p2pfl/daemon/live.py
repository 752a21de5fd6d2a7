"""Live operation of a graph task's cloudlet: replayed readings, pushed halo steps, forecasts.

``[data] replay_speed`` (5-minute steps per second of wall time; 0: off) starts a replay source on
a cloudlet daemon: from the first step of the test split, it advances one step of its readings
at a time, as if each had just been measured. Every step:

- **Pushes**: the cloudlet sends the new step of the sensors each subscriber asked for to that
  subscriber: one ``features.live`` message with that step's readings of those sensors only
  (incremental frames, never the series). A cloudlet subscribes to the owners of its halo when
  their link comes up (``subscribe``, naming its sensors); an owner serves only its own sensors
  that are in the subscriber's halo, the same ones the feature plan lets it ask for.
- **Forecast**: with the model it holds now, the cloudlet forecasts its own sensors 15, 30 and
  60 minutes ahead from the last 12 steps of its own readings and of the halo readings pushed
  to it (a halo reading not pushed, from an owner that is down or late, is missing: masked as
  the task masks missing inputs, and counted in the forecast as ``masked_inputs``).
- **Scoring**: when the step a forecast was for arrives, its error against the own readings is
  kept; the rolling MAE (last ``window`` forecasts per horizon) is in `p2pfl status`, in
  Prometheus (``p2pfl_forecast_mae_mph{horizon}``), and the newest halo reading's age per owner
  too (``p2pfl_halo_age_seconds{owner}``).

Anything a peer sends is checked (it is the owner of exactly the subscribed sensors, a step later
than its last one and inside the series, one finite speed per sensor) and a drop is counted in
the node's DropLog with its reason; a bad push never reaches a forecast, and nothing a peer does
ends the loop. `p2pfl forecast` reads the latest forecast over the control socket.

Messages travel through the driver's side channel (verified and signed like every message).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import trio

from p2pfl.daemon.drops import DropLog
from p2pfl.learning.features import MAX_MPH, encode_readings

__all__ = ["LIVE_KIND", "LiveFeed", "LiveMessage"]

log = logging.getLogger(__name__)

LIVE_KIND = "features.live"
HORIZON_MINUTES = 5


@dataclass(frozen=True, slots=True)
class LiveMessage:
    """A subscription (``step`` None, no values) or one pushed step of some sensors' readings."""

    KIND: ClassVar[str] = LIVE_KIND
    sensors: tuple[int, ...]
    step: int | None = None
    values: bytes = b""

    def to_body(self, encode_weights: Any = None) -> dict[str, Any]:
        body: dict[str, Any] = {"live": "push" if self.step is not None else "subscribe"}
        body["sensors"] = list(self.sensors)
        if self.step is not None:
            body["step"] = self.step
            body["values"] = self.values
        return body


class LiveFeed:
    """The replay source, subscriptions, pushes and rolling forecast of one cloudlet daemon.

    ``needs`` is the feature plan's (owner -> its sensors in this cloudlet's halo);
    ``node_ids[i]`` is cloudlet i's node id; ``model`` returns the weights the node holds now.
    """

    kinds = frozenset({LIVE_KIND})

    def __init__(
        self,
        task: Any,
        node: int,
        needs: Mapping[str, tuple[int, ...]],
        node_ids: Sequence[str],
        *,
        speed: float,
        drops: DropLog,
        model: Callable[[], Any],
        window: int = 288,
        on_step: Callable[[LiveFeed], None] | None = None,
    ) -> None:
        self.task = task
        self.node = node
        self.needs = dict(needs)
        self.node_ids = list(node_ids)
        self.speed = speed
        self.drops = drops
        self.model = model
        self.on_step = on_step
        partition = task.partition
        self.own = [int(s) for s in partition.members[node]]
        self.halo = [int(s) for s in partition.halos[node]]
        self.nodes = self.own + self.halo
        self.column = {s: i for i, s in enumerate(self.halo)}
        self.steps = int(task.windows.raw.shape[0])
        self.start = int(task.windows.bounds["test"][0])
        self.n_his = int(task.windows.n_his)
        self.horizons = tuple(int(h) for h in task.windows.horizons)
        self.laplacian = task.node_data(node, task.n_nodes).laplacian  # fixed by the graph
        self.pushed = np.full((self.steps, len(self.halo)), np.nan, dtype=np.float32)
        self.last_step: dict[str, int] = {}
        self.last_push_at: dict[str, float] = {}
        self.subscribers: dict[str, tuple[int, ...]] = {}
        self.pushes_sent = 0
        self.pushes_received = 0
        self.step: int | None = None
        self.finished = False
        self.forecast: dict[str, Any] | None = None
        self._pending: dict[int, list[tuple[int, np.ndarray]]] = {}
        self._errors = {h: deque[float](maxlen=window) for h in self.horizons}
        self._outbox: set[str] = set()
        self._wake = trio.Event()
        self._net: Any = None
        self._net_weights: Any = None

    # ---- the driver's side channel ------------------------------------------------------------

    def peer_up(self, peer: str) -> None:
        if peer in self.needs:
            self._outbox.add(peer)  # (re)subscribe: the owner forgets us when the link drops
            self._wake.set()

    def received(self, peer: str, kind: str, body: Any) -> None:
        reason = self._take(peer, body)
        if reason is not None:
            self.drops.count("update", reason, peer)

    def _take(self, peer: str, body: Any) -> str | None:
        if not isinstance(body, dict) or body.get("live") not in ("push", "subscribe"):
            return "live_malformed"
        sensors = body.get("sensors")
        if (
            not isinstance(sensors, list)
            or not sensors
            or len(sensors) > len(self.task.graph.sensor_ids)
        ):
            return "live_malformed"
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in sensors):
            return "live_malformed"
        wanted = tuple(sensors)
        if body["live"] == "subscribe":
            return self._subscribe(peer, wanted)
        return self._push_received(peer, wanted, body.get("step"), body.get("values"))

    def _subscribe(self, peer: str, sensors: tuple[int, ...]) -> str | None:
        if peer not in self.node_ids or peer == self.node_ids[self.node]:
            return "live_not_a_cloudlet"
        theirs = {int(s) for s in self.task.partition.halos[self.node_ids.index(peer)]}
        own = set(self.own)
        if any(s not in own or s not in theirs for s in sensors):
            return "live_subscribe_refused"
        self.subscribers[peer] = sensors
        log.info("live subscriber", extra={"peer": peer, "sensors": len(sensors)})
        return None

    def _push_received(
        self, peer: str, sensors: tuple[int, ...], step: Any, values: Any
    ) -> str | None:
        if peer not in self.needs:
            return "live_not_owner"
        if sensors != self.needs[peer]:
            return "live_wrong_sensors"
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < self.steps:
            return "live_bad_step"
        if step <= self.last_step.get(peer, -1):
            return "live_old_step"
        if not isinstance(values, bytes) or len(values) != 4 * len(sensors):
            return "live_wrong_length"
        readings = np.frombuffer(values, dtype="<f4")
        if not np.isfinite(readings).all() or readings.min() < 0 or readings.max() > MAX_MPH:
            return "live_bad_values"
        columns = [self.column[s] for s in sensors]
        self.pushed[step, columns] = np.where(readings == 0.0, np.nan, readings)
        self.last_step[peer] = step
        self.last_push_at[peer] = time.time()
        self.pushes_received += 1
        return None

    # ---- the replay loop -----------------------------------------------------------------------

    async def run(self, send: Callable[[str, Any], Awaitable[None]]) -> None:
        """Replay from the test split's first step at ``speed`` steps/s until the series ends."""
        began = trio.current_time()
        step = self.start
        log.info("live replay started", extra={"step": step, "steps_per_s": self.speed})
        while step < self.steps:
            await self._subscribe_owners(send)
            with trio.move_on_at(began + (step - self.start) / self.speed):
                while True:  # subscriptions keep going out between steps
                    await self._wake.wait()
                    self._wake = trio.Event()
                    await self._subscribe_owners(send)
            self.step = step
            self._score(step)
            await self._push(step, send)
            await self._forecast(step)
            if self.on_step is not None:
                self.on_step(self)
            step += 1
        self.finished = True
        log.info("live replay finished", extra={"step": self.steps - 1})

    async def _subscribe_owners(self, send: Callable[[str, Any], Awaitable[None]]) -> None:
        while self._outbox:
            peer = self._outbox.pop()
            await send(peer, LiveMessage(self.needs[peer]))

    async def _push(self, step: int, send: Callable[[str, Any], Awaitable[None]]) -> None:
        raw = np.asarray(self.task.windows.raw)
        for peer, sensors in list(self.subscribers.items()):
            values = encode_readings(raw[step : step + 1, list(sensors)])
            await send(peer, LiveMessage(sensors, step, values))
            self.pushes_sent += 1

    def _inputs(self, step: int) -> tuple[np.ndarray, int]:
        """The last ``n_his`` steps up to ``step`` of own and halo readings, and how many halo
        sensors have no reading in that window (masked). Halo steps from the test split on are
        only what was pushed; earlier ones are the history the owners sent before learning. A
        halo step not pushed yet (an owner a step or two behind) holds that sensor's previous
        reading in the window; a sensor with none in the window stays missing."""
        lo = step - self.n_his + 1
        window = np.array(np.asarray(self.task.windows.raw)[lo : step + 1, self.nodes])
        live = np.arange(lo, step + 1) >= self.start
        window[live, len(self.own) :] = self.pushed[lo : step + 1][live]
        halo = window[:, len(self.own) :]
        for t in range(1, len(halo)):  # forward fill: the newest reading so far
            halo[t] = np.where(np.isnan(halo[t]), halo[t - 1], halo[t])
        masked = int(np.isnan(halo[-1]).sum())
        return window, masked

    async def _forecast(self, step: int) -> None:
        weights = self.model()
        if weights is None or step - self.n_his + 1 < 0:
            return
        window, masked = self._inputs(step)
        try:
            prediction = await trio.to_thread.run_sync(self._predict, weights, window)
        except Exception:  # a forecast that fails is logged and skipped, never the node's end
            log.exception("live forecast failed", extra={"step": step})
            return
        own = prediction[:, : len(self.own)]  # [horizons, own sensors] mph
        for h, row in zip(self.horizons, own, strict=True):
            if step + h < self.steps:
                self._pending.setdefault(step + h, []).append((h, row))
        ids = self.task.graph.sensor_ids
        self.forecast = {
            "step": step,
            "made_at": time.time(),
            "masked_inputs": masked,
            "halo_sensors": len(self.halo),
            "horizons_min": [h * HORIZON_MINUTES for h in self.horizons],
            "sensors": {
                ids[s]: [float(own[i, j]) for i in range(len(self.horizons))]
                for j, s in enumerate(self.own)
            },
        }

    def _predict(self, weights: Any, window: np.ndarray) -> np.ndarray:
        import torch

        windows = self.task.windows
        if self._net is None:
            self._net = self.task.make_model()
            self._net.eval()
        if self._net_weights is not weights:
            self._net.load_state_dict(weights)
            self._net_weights = weights
        z = np.nan_to_num((window - windows.mean) / windows.std, nan=0.0).astype(np.float32)
        x = torch.from_numpy(z)[None, :, :, None]
        with torch.inference_mode():
            out = self._net(x, self.laplacian) * windows.std + windows.mean
        return np.asarray(out[0].numpy(), dtype=np.float64)

    def _score(self, step: int) -> None:
        truth = np.asarray(self.task.windows.raw)[step, self.own]
        present = ~np.isnan(truth)
        for h, row in self._pending.pop(step, []):
            if present.any():
                self._errors[h].append(float(np.abs(row[present] - truth[present]).mean()))

    # ---- what operators see --------------------------------------------------------------------

    def mae(self) -> dict[str, float | None]:
        """Rolling MAE (mph) per horizon in minutes, None before the first scored forecast."""
        return {
            str(h * HORIZON_MINUTES): (float(np.mean(e)) if e else None)
            for h, e in self._errors.items()
        }

    def halo_age_s(self) -> dict[str, float | None]:
        """Seconds since each owner's newest pushed reading arrived (None: none yet)."""
        now = time.time()
        return {
            p: (now - self.last_push_at[p] if p in self.last_push_at else None) for p in self.needs
        }

    def export(self, metrics: Any) -> None:
        """Set the Prometheus gauges of a :class:`p2pfl.daemon.metrics.NodeMetrics`."""
        for horizon, mae in self.mae().items():
            if mae is not None:
                metrics.forecast_mae.labels(horizon).set(mae)
        for owner, age in self.halo_age_s().items():
            if age is not None:
                metrics.halo_age.labels(owner).set(age)

    def status(self) -> dict[str, Any]:
        lag = {
            p: (
                self.step - self.last_step[p]
                if self.step is not None and p in self.last_step
                else None
            )
            for p in self.needs
        }
        return {
            "replay_speed": self.speed,
            "step": self.step,
            "first_step": self.start,
            "steps": self.steps,
            "finished": self.finished,
            "mae": self.mae(),
            "scored": {str(h * HORIZON_MINUTES): len(e) for h, e in self._errors.items()},
            "halo_age_s": self.halo_age_s(),
            "halo_lag_steps": lag,
            "masked_inputs": None if self.forecast is None else self.forecast["masked_inputs"],
            "subscribers": len(self.subscribers),
            "pushes_sent": self.pushes_sent,
            "pushes_received": self.pushes_received,
        }

    def forecast_reply(self, sensor: str | None) -> dict[str, Any]:
        """`p2pfl forecast`: the latest forecast (one sensor, or all own sensors)."""
        if self.forecast is None:
            return {"step": self.step, "forecast": None, "status": self.status()}
        sensors = self.forecast["sensors"]
        if sensor is not None:
            if sensor not in sensors:
                raise ValueError(
                    f"sensor {sensor!r} is not one of this cloudlet's {len(sensors)} sensors"
                )
            sensors = {sensor: sensors[sensor]}
        return {
            **{k: v for k, v in self.forecast.items() if k != "sensors"},
            "sensors": sensors,
            "mae": self.mae(),
            "halo_age_s": self.halo_age_s(),
            "masked": self.forecast["masked_inputs"] > 0,
        }
