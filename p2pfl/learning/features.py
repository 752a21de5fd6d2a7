"""Node features of graph tasks: a cloudlet's halo readings, served by their owners and used.

A cloudlet holds the readings of its own sensors only (``TrafficTask(cloudlet=...)``, the daemon's
view); the readings of its 2-hop halo are asked of the cloudlets that own them (the protocol
machine's :class:`~p2pfl.protocols.FeaturePlan`) and arrive as ``features.reply`` messages,
signed like every message. This module is everything between those bytes and the training data:

- The wire form (:func:`encode_readings` / :func:`decode_readings`): the whole series of the asked
  sensors, time-major, float32 little-endian, a missing reading as 0 (the published files'
  convention), so every value on the wire is a finite speed.
- The check a reply must pass before the machine takes it (:func:`check_readings`, the plan's
  ``check``): length = the requester's own series length x sensors (the files of one deployment
  are cut from one table, so they share its time axis), every value finite and within
  0..``MAX_MPH``. Which sensors and which owner are the machine's checks (ids in the plan, the
  sender owns them). A failing reply is dropped with its reason, counted in the node's DropLog,
  and the owner stays pending until the plan's deadline.
- :class:`HaloStore`, the daemon's side: what an accepted reply carries is written into the
  cloudlet's table (``TrafficTask.put_readings``) and the trainer gets the rebuilt data, so the
  node trains and evaluates on exactly what its owners sent. Sensors whose owner never answered
  stay missing, which the task masks (inputs 0 after z-scoring, as missing readings are); the
  store says which in ``p2pfl status``.

The virtual engine follows the same recipe: each virtual cloudlet's task is built by the daemon's
call (:func:`p2pfl.learning.ops.node_task`), its plan by :func:`feature_plan`, and the replies its
owners' tasks serve are stored by a :class:`HaloStore` (``TaskWorkload.use_features``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from p2pfl.ml.readings import MAX_MPH as MAX_MPH
from p2pfl.protocols import FeaturePlan

__all__ = [
    "MAX_MPH",
    "HaloStore",
    "check_readings",
    "decode_readings",
    "encode_readings",
    "feature_plan",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0


def encode_readings(values: np.ndarray) -> bytes:
    """[time, sensors] speeds (NaN = missing) as the wire carries them (missing = 0)."""
    clean = np.where(np.isfinite(values), values, 0.0)
    return bytes(np.ascontiguousarray(clean, dtype="<f4").tobytes())


def check_readings(steps: int, sensors: Sequence[int], data: bytes) -> str | None:
    """None if ``data`` is ``steps`` x ``len(sensors)`` finite speeds, else the reason slug."""
    if len(data) != 4 * steps * len(sensors):
        return "features_wrong_length"
    values = np.frombuffer(data, dtype="<f4")
    if not np.isfinite(values).all():
        return "features_not_finite"
    if values.size and (values.min() < 0.0 or values.max() > MAX_MPH):
        return "features_out_of_range"
    return None


def decode_readings(steps: int, sensors: Sequence[int], data: bytes) -> np.ndarray:
    """[steps, sensors] float32, NaN where missing; raises ValueError on what the check refuses."""
    reason = check_readings(steps, sensors, data)
    if reason is not None:
        raise ValueError(reason)
    values = np.frombuffer(data, dtype="<f4").reshape(steps, len(sensors)).astype(np.float32)
    return np.where(values == 0.0, np.nan, values)


def feature_plan(
    task: Any, node: int, node_ids: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S
) -> FeaturePlan | None:
    """Graph tasks: the halo readings cloudlet ``node`` needs, by owner, what it serves, the check.

    ``node_ids[i]`` is the node id of partition ``i``. The owner serves the whole series of the
    asked sensors from the table it holds at the time of the request. None for tasks without a
    graph partition.
    """
    partition = getattr(task, "partition", None)
    if partition is None or getattr(task, "windows", None) is None:
        return None
    if not hasattr(partition, "halos"):
        return None
    owner = partition.owner
    needs: dict[str, tuple[int, ...]] = {}
    for sensor in partition.halos[node]:
        peer = node_ids[int(owner[sensor])]
        needs[peer] = (*needs.get(peer, ()), int(sensor))

    def source(sensors: tuple[int, ...]) -> bytes | None:
        if not sensors or any(not 0 <= s < len(owner) or int(owner[s]) != node for s in sensors):
            return None
        table = task.windows.truth
        columns = table[:, list(sensors)]
        return encode_readings(columns.numpy() if hasattr(columns, "numpy") else columns)

    def check(sensors: tuple[int, ...], data: bytes) -> str | None:
        return check_readings(int(task.windows.truth.shape[0]), sensors, data)

    return FeaturePlan(needs=needs, source=source, timeout=timeout, check=check)


class HaloStore:
    """A cloudlet daemon's halo: the readings its owners sent, stored with its data and used.

    ``on_data`` gets the cloudlet's rebuilt training data after every accepted reply (the
    trainer swaps it in: a training already running keeps the data it started with).
    """

    def __init__(
        self,
        task: Any,
        node: int,
        plan: FeaturePlan,
        on_data: Callable[[Any], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.task = task
        self.node = node
        self.plan = plan
        self.on_data = on_data
        self.clock = clock
        self.received: dict[str, float] = {}
        """Owner -> when its readings were stored."""
        self.means: dict[str, float | None] = {}
        """Owner -> mean of its sensors' readings as stored in the task's table after its reply
        (mph, observed ones): what status shows, and what the node trains on."""
        self.digests: dict[str, str] = {}
        """Owner -> sha256 (first 16 hex) of the bytes it sent."""
        self.started_at = clock()

    @property
    def halo_sensors(self) -> int:
        return sum(len(s) for s in self.plan.needs.values())

    def missing(self) -> dict[str, tuple[int, ...]]:
        """Owners that have not (yet) sent their readings, with the sensors they owe."""
        return {p: s for p, s in self.plan.needs.items() if p not in self.received}

    def use(self, peer: str, sensors: tuple[int, ...], data: bytes) -> None:
        """Store an accepted reply's readings (the machine checked sender, sensors and data)."""
        if self.plan.needs.get(peer) != sensors:
            raise ValueError(f"{peer} does not owe sensors {sensors}")  # the machine's job
        steps = int(self.task.windows.truth.shape[0])
        values = decode_readings(steps, sensors, data)
        self.task.put_readings(sensors, values)
        self.received[peer] = self.clock()
        stored = np.asarray(self.task.windows.raw)[:, list(sensors)]  # what training reads
        observed = stored[~np.isnan(stored)]
        self.means[peer] = float(observed.mean()) if observed.size else None
        self.digests[peer] = hashlib.sha256(data).hexdigest()[:16]
        self.on_data(self.task.node_data(self.node, self.task.n_nodes))
        log.info(
            "halo readings stored",
            extra={"peer": peer, "sensors": len(sensors), "bytes": len(data)},
        )

    def status(self, learning: bool | None = None) -> dict[str, Any]:
        """For `p2pfl status`: what arrived from whom, and what is masked because it did not.

        ``learning``: whether the protocol machine began learning (then owners that have not
        answered are masked, no longer waited for); None: judged by the plan's timeout.
        """
        missing = self.missing()
        waited = self.clock() - self.started_at
        waiting = not learning if learning is not None else waited < self.plan.timeout
        return {
            "sensors": self.halo_sensors,
            "received_sensors": self.halo_sensors - sum(len(s) for s in missing.values()),
            "masked_sensors": sum(len(s) for s in missing.values()),
            "owners": {
                peer: {
                    "sensors": len(sensors),
                    "received": peer in self.received,
                    "mean_mph": self.means.get(peer),
                    "digest": self.digests.get(peer),
                }
                for peer, sensors in sorted(self.plan.needs.items())
            },
            "waiting": bool(missing) and waiting,
            "ignored_sensors": len(getattr(self.task, "ignored_sensors", ())),
        }
