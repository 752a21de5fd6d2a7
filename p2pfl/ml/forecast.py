"""Traffic forecasting: windows over a speed table, cloudlet data, baselines, the STGCN task.

Windowing: 12 readings in, the readings 3, 6 and 12 steps after the last one out (15/30/60 min).
The table is split 70/15/15 in time *before* windowing, so no window straddles two splits, and
z-scored with the mean and standard deviation of the observed training readings only. Missing
inputs become 0 after z-scoring (the training mean); missing targets are masked out of loss and
metrics.

Each cloudlet's :class:`CloudletData` holds its subgraph (own sensors first, then the 2-hop
halo) and its scaled Laplacian; loss and metrics use its own sensors only. ``num_samples`` counts
supervised targets: training windows x own sensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from p2pfl.ml.metrics import ForecastMeter
from p2pfl.ml.models import STGCN, STGCNConfig
from p2pfl.ml.partition import CloudletPartition, partition_cloudlets
from p2pfl.ml.readings import ReadingsError, load_speeds
from p2pfl.ml.synthetic import STEPS_PER_DAY, SpeedModel, generate_speeds
from p2pfl.ml.task import NodeData, Task
from p2pfl.ml.traffic import ADJACENCIES, SensorGraph, load_graph, scaled_laplacian
from p2pfl.ml.train import Batch, BatchSource, LossFn, TrainConfig

__all__ = [
    "SPLITS",
    "CloudletData",
    "SpeedWindows",
    "TrafficTask",
    "WindowSamples",
    "baseline_metrics",
]

SPLITS = {"train": (0.0, 0.7), "val": (0.7, 0.85), "test": (0.85, 1.0)}


class SpeedWindows:
    """A speed table prepared for forecasting: z-scored inputs, raw targets, window starts."""

    def __init__(
        self,
        speeds: np.ndarray,
        *,
        n_his: int = 12,
        horizons: tuple[int, ...] = (3, 6, 12),
        start_weekday: int = 3,
        stats: tuple[float, float] | None = None,
    ) -> None:
        steps = speeds.shape[0]
        self.n_his, self.horizons, self.start_weekday = n_his, horizons, start_weekday
        self.bounds = {k: (round(a * steps), round(b * steps)) for k, (a, b) in SPLITS.items()}
        if stats is None:
            train = speeds[: self.bounds["train"][1]]
            observed = train[~np.isnan(train)]
            if observed.size == 0:
                raise ValueError("the training split holds no observed reading")
            stats = float(observed.mean()), float(observed.std()) or 1.0
        self.mean, self.std = stats
        z = (speeds - self.mean) / self.std
        self.z = torch.from_numpy(np.nan_to_num(z, nan=0.0).astype(np.float32))
        self.truth = torch.from_numpy(speeds.astype(np.float32))  # mph, NaN = missing
        self.raw = speeds

    def starts(self, split: str) -> torch.Tensor:
        """First input step of every window lying wholly inside ``split``."""
        lo, hi = self.bounds[split]
        last = hi - (self.n_his + max(self.horizons))
        return torch.arange(lo, max(lo, last + 1), dtype=torch.long)

    def target_steps(self, starts: torch.Tensor) -> torch.Tensor:
        """[windows, horizons] time index of each target."""
        offsets = torch.tensor([self.n_his - 1 + h for h in self.horizons])
        return starts[:, None] + offsets[None, :]


class WindowSamples:
    """Windows of one split on one sensor subset, drawn as (inputs, targets) batches.

    Inputs [B, n_his, nodes, 1] z-scored; targets [B, horizons, nodes] in mph (NaN = missing).
    Windows are gathered per batch from the shared table: no copy of 12x the data.
    """

    def __init__(self, windows: SpeedWindows, nodes: torch.Tensor, split: str) -> None:
        self.windows = windows
        self.z = windows.z[:, nodes].contiguous()
        self.truth = windows.truth[:, nodes].contiguous()
        self.window_starts = windows.starts(split)
        self._offsets = torch.arange(windows.n_his)

    def __len__(self) -> int:
        return len(self.window_starts)

    def batches_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def _batch(self, starts: torch.Tensor) -> Batch:
        x = self.z[starts[:, None] + self._offsets[None, :]].unsqueeze(-1)
        y = self.truth[self.windows.target_steps(starts)]
        return x, y

    def batches(self, steps: int, batch_size: int, generator: torch.Generator):  # type: ignore[no-untyped-def]
        order = torch.empty(0, dtype=torch.long)
        position = 0
        for _ in range(steps):
            if position >= len(order):
                order, position = torch.randperm(len(self), generator=generator), 0
            yield self._batch(self.window_starts[order[position : position + batch_size]])
            position += batch_size

    def in_order(self, batch_size: int):  # type: ignore[no-untyped-def]
        for i in range(0, len(self), batch_size):
            yield self._batch(self.window_starts[i : i + batch_size])


@dataclass(frozen=True, eq=False)
class CloudletData(NodeData):
    """One cloudlet's (or the central) training graph and its windows."""

    cloudlet: int | None  # None for the central data
    nodes: torch.Tensor  # graph sensor indices: own first, then halo
    n_own: int
    laplacian: torch.Tensor  # [len(nodes), len(nodes)] scaled Laplacian
    train_set: WindowSamples
    val_set: WindowSamples
    test_set: WindowSamples

    @property
    def num_samples(self) -> int:
        return len(self.train_set) * self.n_own

    @property
    def own(self) -> torch.Tensor:
        mask = torch.zeros(len(self.nodes), dtype=torch.bool)
        mask[: self.n_own] = True
        return mask


def _masked_mae(prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    present = ~torch.isnan(truth)
    err = torch.where(present, prediction - torch.nan_to_num(truth), 0.0).abs()
    return err.sum() / present.sum().clamp(min=1)


class TrafficTask(Task):
    """STGCN on a sensor graph; node i is cloudlet i.

    Options: ``graph`` (packaged name or folder), ``days`` of synthetic speeds (default 28),
    ``readings`` (a CSV/NPZ/HDF5 file of real speeds, replacing the synthetic ones),
    ``speed_model`` (:class:`~p2pfl.ml.synthetic.SpeedModel`), ``config`` (TrainConfig),
    ``hops`` of the halo (2), ``range_km`` of the cloudlet neighbour graph, ``adjacency``
    (``"road"`` or ``"kernel"``, see :mod:`p2pfl.ml.traffic`) and ``kernel_radius_km``.

    ``cloudlet`` (a daemon's view): the task holds the readings of that cloudlet's own sensors
    only. A readings file may then hold just those (``p2pfl data split``); readings of other
    sensors in it, or of the synthetic table, are dropped (``ignored_sensors`` names them), and
    the z-score statistics are those of the own sensors' training readings. The halo's columns
    stay missing (masked) until :meth:`put_readings` stores what their owners sent.
    """

    kind = "forecast"
    primary_metric = "mae_15"
    higher_is_better = False

    def __init__(
        self,
        *,
        graph: str | Path = "metr-la",
        n_nodes: int = 7,
        seed: int = 0,
        name: str | None = None,
        days: int = 28,
        readings: str | Path | None = None,
        speed_model: SpeedModel | None = None,
        config: TrainConfig | None = None,
        model_config: STGCNConfig | None = None,
        hops: int = 2,
        range_km: float | None = None,
        adjacency: str = "road",
        kernel_radius_km: float | None = None,
        cloudlet: int | None = None,
    ) -> None:
        super().__init__(n_nodes=n_nodes, seed=seed)
        self.graph: SensorGraph = load_graph(graph)
        self.name = name or f"traffic-{self.graph.name}"
        if adjacency not in ADJACENCIES:
            raise ValueError(
                f"adjacency {adjacency!r} is unknown; choose one of {', '.join(ADJACENCIES)}"
            )
        if kernel_radius_km is not None and adjacency != "kernel":
            raise ValueError('kernel_radius_km applies to adjacency = "kernel" only')
        self.adjacency, self.kernel_radius_km = adjacency, kernel_radius_km
        self.partition: CloudletPartition = partition_cloudlets(
            self.graph,
            hops=hops,
            range_km=range_km,
            adjacency=adjacency,
            kernel_radius_km=kernel_radius_km,
        )
        if n_nodes != len(self.graph.cloudlets):
            raise ValueError(
                f"task {self.name!r} has one node per cloudlet: n_nodes must be "
                f"{len(self.graph.cloudlets)}, got {n_nodes}"
            )
        self.model_config = model_config or STGCNConfig()
        self.config = config or TrainConfig(lr=2e-3, batch_size=8)
        speed_model = speed_model or SpeedModel()
        if cloudlet is not None and not 0 <= cloudlet < n_nodes:
            raise ValueError(f"cloudlet must be 0..{n_nodes - 1}, got {cloudlet}")
        self.cloudlet = cloudlet
        if readings is not None:
            speeds = load_speeds(Path(readings), self.graph, partial=cloudlet is not None)
        else:
            speeds = generate_speeds(self.graph, days=days, seed=seed, model=speed_model)
        self.ignored_sensors: tuple[str, ...] = ()
        stats = None
        if cloudlet is not None:
            own = np.zeros(self.graph.num_sensors, dtype=bool)
            own[self.partition.members[cloudlet]] = True
            held = ~np.isnan(speeds).all(axis=0)
            missing = own & ~held
            if missing.any():
                shown = ", ".join(self.graph.sensor_ids[i] for i in np.flatnonzero(missing)[:5])
                raise ReadingsError(
                    f"{readings}: {int(missing.sum())} sensor(s) of cloudlet {cloudlet} have no "
                    f"readings ({shown}); give this cloudlet the file `p2pfl data split` wrote "
                    "for it"
                )
            if readings is not None:  # synthetic speeds are generated, not given
                self.ignored_sensors = tuple(
                    self.graph.sensor_ids[i] for i in np.flatnonzero(held & ~own)
                )
            speeds = np.where(own[None, :], speeds, np.nan).astype(np.float32)
            split_end = round(SPLITS["train"][1] * speeds.shape[0])
            observed = speeds[:split_end][~np.isnan(speeds[:split_end])]
            if observed.size == 0:
                raise ValueError(f"cloudlet {cloudlet}: its training split holds no reading")
            stats = float(observed.mean()), float(observed.std()) or 1.0
        self._start_weekday = speed_model.start_weekday
        self.windows = self._windows(speeds, stats)
        self._data: dict[int | None, CloudletData] = {}

    def put_readings(self, sensors: Sequence[int], values: np.ndarray) -> None:
        """Store readings of halo ``sensors`` ([time, len(sensors)], NaN = missing) an owner sent.

        Only a cloudlet's view takes them, only for its halo, and only for its whole series; the
        z-score statistics stay those of the own sensors. The cloudlet's data is rebuilt.
        """
        if self.cloudlet is None:
            raise ValueError("readings are put into a cloudlet's view only (cloudlet option)")
        halo = {int(s) for s in self.partition.halos[self.cloudlet]}
        columns = [int(s) for s in sensors]
        if not columns or any(s not in halo for s in columns):
            raise ValueError(f"sensors {columns} are not all in cloudlet {self.cloudlet}'s halo")
        raw = np.array(self.windows.raw, dtype=np.float32, copy=True)
        expected = (raw.shape[0], len(columns))
        if values.shape != expected:
            raise ValueError(f"readings of shape {values.shape}; expected {expected}")
        raw[:, columns] = values
        self.windows = self._windows(raw, (self.windows.mean, self.windows.std))
        self._data.clear()

    def _windows(self, speeds: np.ndarray, stats: tuple[float, float] | None) -> SpeedWindows:
        return SpeedWindows(
            speeds,
            n_his=self.model_config.n_his,
            horizons=self.model_config.horizons,
            start_weekday=self._start_weekday,
            stats=stats,
        )

    def _build_model(self) -> nn.Module:
        return STGCN(self.model_config)

    def _cloudlet_data(self, cloudlet: int | None) -> CloudletData:
        if cloudlet not in self._data:
            if cloudlet is None:
                nodes = self.partition.covered
                n_own = len(nodes)
            else:
                nodes = self.partition.subgraph(cloudlet)
                n_own = len(self.partition.members[cloudlet])
            adjacency = self.graph.adjacency(self.adjacency, self.kernel_radius_km)[
                np.ix_(nodes, nodes)
            ]
            index = torch.from_numpy(nodes)
            self._data[cloudlet] = CloudletData(
                cloudlet=cloudlet,
                nodes=index,
                n_own=n_own,
                laplacian=torch.from_numpy(scaled_laplacian(adjacency)),
                train_set=WindowSamples(self.windows, index, "train"),
                val_set=WindowSamples(self.windows, index, "val"),
                test_set=WindowSamples(self.windows, index, "test"),
            )
        return self._data[cloudlet]

    def node_data(self, node: int, n_nodes: int) -> CloudletData:
        if n_nodes != self.n_nodes or not 0 <= node < n_nodes:
            raise ValueError(f"{self.name}: node must be a cloudlet 0..{self.n_nodes - 1}")
        return self._cloudlet_data(node)

    def central_data(self) -> CloudletData:
        """All sensors covered by some cloudlet, as one graph: the centralized baseline."""
        return self._cloudlet_data(None)

    def _predict(self, model: nn.Module, x: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        return model(x, laplacian) * self.windows.std + self.windows.mean  # type: ignore[no-any-return]

    def _training(self, data: NodeData, device: str) -> tuple[BatchSource, LossFn]:
        assert isinstance(data, CloudletData)
        laplacian = data.laplacian.to(device)
        n_own = data.n_own

        def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
            x, y = batch
            prediction = self._predict(model, x, laplacian)
            # Loss on own sensors only: the halo is input, another cloudlet's job to predict.
            return _masked_mae(prediction[..., :n_own], y[..., :n_own]), len(x) * n_own

        return data.train_set, loss_fn

    def evaluate(
        self,
        model: nn.Module,
        data: NodeData | None = None,
        *,
        device: str = "cpu",
        split: str = "test",
    ) -> dict[str, float]:
        """Masked MAE/RMSE/WMAPE at 15/30/60 min (mph) on the data's own sensors.

        Without data: on every covered sensor of the full graph (comparable across protocols).
        """
        data = data if isinstance(data, CloudletData) else self.central_data()
        samples = {"train": data.train_set, "val": data.val_set, "test": data.test_set}[split]
        meter = ForecastMeter(self.model_config.horizons)
        laplacian = data.laplacian.to(device)
        was_training = model.training
        model.to(device).eval()
        with torch.inference_mode():
            for x, y in samples.in_order(64):
                meter.update(self._predict(model, x.to(device), laplacian), y, data.own)
        model.train(was_training)
        return meter.result()

    def halo_report(self) -> list[dict[str, float]]:
        """Per cloudlet: own and halo sensor counts, halo MB per day and for the whole table."""
        steps = self.windows.truth.shape[0]
        return [
            {
                "cloudlet": c,
                "own_sensors": len(self.partition.members[c]),
                "halo_sensors": len(self.partition.halos[c]),
                "halo_mb_per_day": self.partition.halo_mb(c, STEPS_PER_DAY),
                "halo_mb_total": self.partition.halo_mb(c, steps),
            }
            for c in range(self.n_nodes)
        ]


def baseline_metrics(
    task: TrafficTask, data: CloudletData | None = None
) -> dict[str, dict[str, float]]:
    """Last-value and historical-average forecasts, scored like the model (test split).

    - last value: the last observed reading of the input window (the training mean if none).
    - historical average: the training mean of the sensor at the same time of day, separately
      for weekdays and weekends (time-of-week slots would be nearly empty with a few weeks).
    """
    data = data or task.central_data()
    w = task.windows
    nodes = data.nodes.numpy()
    raw = w.raw[:, nodes]
    steps = raw.shape[0]
    day = np.arange(steps) // STEPS_PER_DAY
    weekend = ((w.start_weekday + day) % 7) >= 5
    slot = (np.arange(steps) % STEPS_PER_DAY) + STEPS_PER_DAY * weekend
    train_end = w.bounds["train"][1]
    sums = np.zeros((2 * STEPS_PER_DAY, len(nodes)))
    counts = np.zeros_like(sums)
    observed = ~np.isnan(raw[:train_end])
    np.add.at(sums, slot[:train_end], np.where(observed, raw[:train_end], 0.0))
    np.add.at(counts, slot[:train_end], observed)
    sensor_mean = np.nanmean(raw[:train_end], axis=0)
    history = np.where(counts > 0, sums / np.maximum(counts, 1), sensor_mean)

    starts = w.starts("test")
    targets = w.target_steps(starts).numpy()
    truth = torch.from_numpy(raw[targets])  # [W, H, N]
    inputs = raw[starts.numpy()[:, None] + np.arange(w.n_his)[None, :]]  # [W, n_his, N]
    last = np.full(inputs.shape[::2], w.mean)
    for t in range(w.n_his):  # forward fill: keep the latest observed reading
        last = np.where(np.isnan(inputs[:, t]), last, inputs[:, t])
    last_value = torch.from_numpy(np.repeat(last[:, None, :], len(w.horizons), axis=1))
    historical = torch.from_numpy(history[slot[targets]])
    out = {}
    for name, prediction in (("last_value", last_value), ("historical_average", historical)):
        meter = ForecastMeter(w.horizons)
        meter.update(prediction, truth, data.own)
        out[name] = meter.result()
    return out
