"""The traffic task: cloudlet data, metrics keys, and an STGCN that beats the baselines."""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.ml import load_task
from p2pfl.ml.forecast import TrafficTask, baseline_metrics
from p2pfl.ml.synthetic import SpeedModel
from p2pfl.ml.train import TrainConfig

KEYS = {f"{m}_{h}" for m in ("mae", "rmse", "wmape") for h in (15, 30, 60)} | {"loss"}


@pytest.fixture(scope="module")
def task() -> TrafficTask:
    t = load_task("traffic-metr-la", n_nodes=7, days=2)
    assert isinstance(t, TrafficTask)
    return t


def test_traffic_task_has_one_node_per_cloudlet(task: TrafficTask) -> None:
    assert (task.kind, task.primary_metric, task.higher_is_better) == ("forecast", "mae_15", False)
    own = 0
    for c in range(7):
        data = task.node_data(c, 7)
        assert data.n_own == len(task.partition.members[c])
        assert data.laplacian.shape == (len(data.nodes), len(data.nodes))
        assert data.num_samples == len(data.train_set) * data.n_own
        own += data.n_own
    assert own == task.central_data().n_own == 207 - task.partition.left_out
    with pytest.raises(ValueError, match="n_nodes must be 7"):
        load_task("traffic-metr-la", n_nodes=5, days=2)


def test_forecast_metrics_have_every_horizon_and_score_own_sensors_only(task: TrafficTask) -> None:
    model = task.make_model()
    data = task.node_data(2, 7)
    metrics = task.evaluate(model, data)
    assert set(metrics) == KEYS and all(math.isfinite(v) for v in metrics.values())
    x, y = next(data.test_set.in_order(4))
    assert x.shape == (4, 12, len(data.nodes), 1) and y.shape == (4, 3, len(data.nodes))
    # Poisoning the halo's truth must not change a cloudlet's metrics.
    data.test_set.truth[:, data.n_own :] = 1e6
    try:
        assert task.evaluate(model, data) == metrics
    finally:
        data.test_set.truth[:, data.n_own :] = data.test_set.windows.truth[
            :, data.nodes[data.n_own :]
        ]


def test_halo_report_gives_megabytes_per_cloudlet(task: TrafficTask) -> None:
    report = task.halo_report()
    assert len(report) == 7
    for row in report:
        assert row["halo_mb_per_day"] == pytest.approx(row["halo_sensors"] * 288 * 4 / 1e6)


@pytest.mark.slow
def test_briefly_trained_stgcn_beats_last_value_and_historical_average_at_15_min() -> None:
    # Three synthetic weekdays (the test split is Wednesday 15:00-24:00, evening rush included),
    # one cloudlet (own sensors + halo): 2 epochs at lr 2e-3, 1 at 5e-4, batch 8 (~220 steps).
    # Dropout draws from the global generator: seed it so the run does not depend on test order.
    # Measured over dropout seeds 0-2: MAE 2.93-3.12 mph vs. 3.35 (last value), 3.45 (hist. avg.).
    torch.manual_seed(0)
    task = load_task("traffic-metr-la", n_nodes=7, days=3, speed_model=SpeedModel(start_weekday=0))
    assert isinstance(task, TrafficTask)
    data = task.node_data(3, 7)
    model = task.make_model()
    for epochs, lr in [(2.0, 2e-3), (1.0, 5e-4)]:
        task.config = TrainConfig(lr=lr, batch_size=8)
        task.train(model, data, epochs=epochs)
    ours = task.evaluate(model, data)["mae_15"]
    baselines = baseline_metrics(task, data)
    assert ours < baselines["last_value"]["mae_15"], (ours, baselines)
    assert ours < baselines["historical_average"]["mae_15"], (ours, baselines)
