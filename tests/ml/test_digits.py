"""The digits task: partitions and a centralized MLP baseline."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from p2pfl.ml import load_task
from p2pfl.ml.partition import partition_dirichlet, partition_iid, partition_quantity


def test_centralized_mlp_reaches_90_percent_in_seconds() -> None:
    task = load_task("digits", n_nodes=1)
    model = task.make_model()
    started = time.perf_counter()
    report = task.train(model, task.central_data(), epochs=8)
    elapsed = time.perf_counter() - started
    metrics = task.evaluate(model)
    assert metrics["accuracy"] >= 0.90, metrics
    assert report.samples == 8 * 1437
    assert report.samples_per_s > 0 and report.wall_s <= elapsed
    assert report.energy_j is None or report.energy_j >= 0


def test_make_model_gives_the_same_initial_weights_for_a_seed() -> None:
    a = load_task("digits", n_nodes=2, seed=1).make_model().state_dict()
    b = load_task("digits", n_nodes=2, seed=1).make_model().state_dict()
    c = load_task("digits", n_nodes=2, seed=2).make_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.0.weight"], c["net.0.weight"])


def test_evaluate_does_not_change_the_model() -> None:
    task = load_task("digits-logreg", n_nodes=3)
    model = task.make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task.evaluate(model, task.node_data(1, 3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "quantity"])
def test_node_partitions_are_disjoint_cover_everything_and_none_is_empty(partition: str) -> None:
    task = load_task("digits", n_nodes=10, partition=partition, alpha=0.3, seed=4)
    sizes = [task.node_data(i, 10).num_samples for i in range(10)]
    assert min(sizes) >= 1
    assert sum(sizes) == task.central_data().num_samples
    rows = torch.cat([task.node_data(i, 10).train_set.tensors[0] for i in range(10)])
    assert len(torch.unique(rows, dim=0)) == len(
        torch.unique(task.central_data().train_set.tensors[0], dim=0)
    )


def test_dirichlet_with_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)

    def mean_classes(alpha: float) -> float:
        parts = partition_dirichlet(labels, 10, alpha, np.random.default_rng(1))
        return float(np.mean([len(np.unique(labels[p])) for p in parts]))

    assert mean_classes(0.1) < 4 < 9 < mean_classes(100.0)
    iid = partition_iid(1000, 7, rng)
    assert sorted(np.concatenate(iid).tolist()) == list(range(1000))
    qty = partition_quantity(1000, 7, 0.2, rng)
    assert max(map(len, qty)) > 3 * min(map(len, qty))


def test_partitions_are_deterministic_for_a_seed() -> None:
    a = load_task("digits", n_nodes=5, partition="dirichlet", seed=9).node_data(2, 5)
    b = load_task("digits", n_nodes=5, partition="dirichlet", seed=9).node_data(2, 5)
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])


def test_unknown_task_and_partition_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mnist", n_nodes=2)
    with pytest.raises(ValueError, match="unknown partition"):
        load_task("digits", n_nodes=2, partition="shards")
