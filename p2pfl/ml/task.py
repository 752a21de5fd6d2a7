"""Tasks: a model, its data split across nodes, and how to train and score it.

A :class:`Task` is what the simulator and the daemon call; everything else in ``p2pfl.ml`` is
behind it. Get one with :func:`p2pfl.ml.catalog.load_task`:

- ``"digits"``: scikit-learn's 8x8 digits (1,797 real images, shipped with p2pfl as package data:
  see :mod:`p2pfl.ml.digits`), :class:`~p2pfl.ml.models.MLP`; split IID / Dirichlet label skew /
  quantity skew over nodes.
- ``"digits-logreg"``: the same data with a 650-parameter logistic regression, for runs with
  a thousand virtual nodes.
- ``"traffic-metr-la"``, ``"traffic-pems-bay"``: STGCN on the sensor graph, one node per
  cloudlet (7); see :mod:`p2pfl.ml.forecast`.

The digits test set is fixed (20 %, stratified, independent of the seed) so that runs with
different seeds and partitions score on the same images; every node evaluates on it.
``make_model()`` is deterministic for the task's seed: every node starts from the same weights.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from p2pfl.ml.digits import load_split
from p2pfl.ml.metrics import ClassificationMeter
from p2pfl.ml.models import MLP, LogisticRegression
from p2pfl.ml.partition import partition_samples
from p2pfl.ml.train import (
    Batch,
    BatchSource,
    LossFn,
    TensorSamples,
    TrainConfig,
    TrainReport,
    fit,
)

__all__ = ["ClassificationData", "DigitsTask", "NodeData", "Task"]


class NodeData(ABC):
    """One node's share of a task's data; ``num_samples`` weighs it in aggregation."""

    @property
    @abstractmethod
    def num_samples(self) -> int: ...


class Task(ABC):
    """The contract between learning and the protocols/simulator/daemon.

    Subclasses set ``name``, ``kind`` ("classification" or "forecast"), ``primary_metric``,
    ``higher_is_better`` and ``config``, and say in ``_training`` what to train on and what to
    minimise. ``train`` changes the model in place; ``evaluate`` does not change it.
    """

    name: str
    kind: Literal["classification", "forecast"]
    primary_metric: str
    higher_is_better: bool
    n_nodes: int
    seed: int

    def __init__(self, *, n_nodes: int, seed: int) -> None:
        self.n_nodes = n_nodes
        self.seed = seed
        self._calls = 0
        self._stream: int | None = None

    @abstractmethod
    def _build_model(self) -> nn.Module: ...

    def make_model(self) -> nn.Module:
        """A fresh model, with the same initial weights on every call for a given seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._build_model()

    @abstractmethod
    def node_data(self, node: int, n_nodes: int) -> NodeData: ...

    @abstractmethod
    def central_data(self) -> NodeData: ...

    config: TrainConfig

    @abstractmethod
    def _training(self, data: NodeData, device: str) -> tuple[BatchSource, LossFn]:
        """The samples ``train`` draws from ``data`` and the loss it minimises on ``device``."""

    def train(
        self,
        model: nn.Module,
        data: NodeData,
        *,
        epochs: float,
        device: str = "cpu",
        should_stop: Callable[[], bool] | None = None,
        lr_scale: float = 1.0,
        optimizer_state: dict[str, Any] | None = None,
    ) -> TrainReport:
        """Train ``model`` in place on ``data`` (see :func:`~p2pfl.ml.train.fit`)."""
        samples, loss_fn = self._training(data, device)
        return fit(
            model,
            samples,
            loss_fn,
            epochs=epochs,
            config=self.config,
            device=device,
            generator=self._generator(),
            should_stop=should_stop,
            lr_scale=lr_scale,
            optimizer_state=optimizer_state,
        )

    @abstractmethod
    def evaluate(
        self, model: nn.Module, data: NodeData | None = None, *, device: str = "cpu"
    ) -> dict[str, float]: ...

    def use_stream(self, name: str) -> None:
        """Draw training shuffles from the stream ``name`` (from its first call on): runs that
        share this task, such as the setups of one scenario, then do not shift each other's
        shuffles, and a run's results do not depend on what ran before it."""
        self._stream = stream_seed(self.seed, name)
        self._calls = 0

    def _generator(self) -> torch.Generator:
        # A different but reproducible shuffle for each training call.
        self._calls += 1
        if self._stream is None:
            return torch.Generator().manual_seed(self.seed * 1_000_003 + self._calls)
        return torch.Generator().manual_seed(self._stream + self._calls)


def stream_seed(seed: int, name: str) -> int:
    """A 62-bit seed for the stream ``name`` of a run seeded ``seed`` (room left for counters)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


@dataclass(frozen=True, eq=False)
class ClassificationData(NodeData):
    train_set: TensorSamples  # (features float32, labels int64)
    test_set: TensorSamples

    @property
    def num_samples(self) -> int:
        return len(self.train_set)


@cache
def _digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    split = load_split()  # shipped with p2pfl: no scikit-learn at run time
    return (
        torch.tensor(split.x_train, dtype=torch.float32),
        torch.tensor(split.y_train, dtype=torch.int64),
        torch.tensor(split.x_test, dtype=torch.float32),
        torch.tensor(split.y_test, dtype=torch.int64),
    )


class DigitsTask(Task):
    """8x8 digits classification (MLP, or logistic regression with ``model="logreg"``)."""

    kind = "classification"
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        *,
        n_nodes: int,
        partition: str = "iid",
        alpha: float = 0.5,
        seed: int = 0,
        model: str = "mlp",
        config: TrainConfig | None = None,
    ) -> None:
        super().__init__(n_nodes=n_nodes, seed=seed)
        if model not in ("mlp", "logreg"):
            raise ValueError(f"digits model must be 'mlp' or 'logreg', got {model!r}")
        self.name = "digits" if model == "mlp" else "digits-logreg"
        self.model_kind = model
        self.partition, self.alpha = partition, alpha
        self.config = config or TrainConfig(lr=3e-3, batch_size=32)
        x_train, y_train, x_test, y_test = _digits_split()
        self._train = (x_train, y_train)
        self._test = TensorSamples(x_test, y_test)
        self._parts: dict[int, list[np.ndarray]] = {}
        self.node_data(0, n_nodes)  # partition now: bad options fail at load time

    def _build_model(self) -> nn.Module:
        return MLP() if self.model_kind == "mlp" else LogisticRegression()

    def node_data(self, node: int, n_nodes: int) -> ClassificationData:
        if n_nodes not in self._parts:
            labels = self._train[1].numpy()
            self._parts[n_nodes] = partition_samples(
                labels, n_nodes, partition=self.partition, alpha=self.alpha, seed=self.seed
            )
        if not 0 <= node < n_nodes:
            raise ValueError(f"node {node} is not in 0..{n_nodes - 1}")
        idx = torch.from_numpy(self._parts[n_nodes][node])
        x, y = self._train
        return ClassificationData(TensorSamples(x[idx], y[idx]), self._test)

    def central_data(self) -> ClassificationData:
        return ClassificationData(TensorSamples(*self._train), self._test)

    def _training(self, data: NodeData, device: str) -> tuple[BatchSource, LossFn]:
        assert isinstance(data, ClassificationData)

        def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
            x, y = batch
            return nn.functional.cross_entropy(model(x), y), len(y)

        return data.train_set, loss_fn

    def evaluate(
        self, model: nn.Module, data: NodeData | None = None, *, device: str = "cpu"
    ) -> dict[str, float]:
        test = data.test_set if isinstance(data, ClassificationData) else self._test
        meter = ClassificationMeter()
        was_training = model.training
        model.to(device).eval()
        with torch.inference_mode():
            for x, y in test.in_order(512):
                meter.update(model(x.to(device)), y.to(device))
        model.train(was_training)
        return meter.result()
