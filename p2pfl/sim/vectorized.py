"""Numpy training of the digits logistic regression, for virtual runs with thousands of nodes.

The learning core trains through torch modules and optimizers: right for real models, but each
step of a 650-parameter model then costs about 3 ms of dispatch overhead on this machine (measured),
which makes 1,000 nodes x 50 rounds take minutes. This path trains the *same* model on the *same*
data (task ``digits-logreg`` of ``p2pfl.ml``: its initial weights, node partitions, test split,
learning rate, batch size) with the same algorithm (Adam, fresh per training as in
``p2pfl.ml.train.fit``; softmax cross-entropy; shuffled mini-batches), written out in numpy on a
flat float32 vector of the 650 parameters (weight row-major, then bias). It is real training,
only without torch's per-op overhead; ``tests/sim`` checks its evaluation against the task's.

Validation and aggregation still go through ``p2pfl.ml.aggregation`` (the vector is wrapped as
a one-tensor state_dict without copying), so the rules are the learning core's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from p2pfl.learning.ops import StateDictOps, load_scenario_task
from p2pfl.ml.task import stream_seed
from p2pfl.protocols import FeaturePlan
from p2pfl.sim.scenario import Scenario, scenario_error

Vector = np.ndarray
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8


@dataclass(frozen=True, slots=True)
class VectorReport:
    samples: int
    loss: float


class VectorOps(StateDictOps):
    """``ModelOps`` over flat parameter vectors: each is wrapped as a one-tensor state_dict."""

    def validate(self, reference: Vector, update: Vector) -> str | None:  # type: ignore[override]
        if not isinstance(update, np.ndarray):
            return "not_a_tensor"
        return super().validate({"p": torch.from_numpy(reference)}, {"p": torch.from_numpy(update)})

    def distance(self, reference: Vector, update: Vector) -> float:  # type: ignore[override]
        return float(np.linalg.norm(update.astype(np.float64) - reference))

    def aggregate(  # type: ignore[override]
        self,
        rule: str,
        reference: Vector,
        models: Sequence[Vector],
        weights: Sequence[float],
        params: Mapping[str, float] | None = None,
    ) -> Vector:
        wrapped = [{"p": torch.from_numpy(m)} for m in models]
        return (
            super()
            .aggregate(rule, {"p": torch.from_numpy(reference)}, wrapped, weights, params)["p"]
            .numpy()
        )


class VectorizedLogReg:
    """``Workload`` for ``digits-logreg`` with numpy training (see the module docstring)."""

    def __init__(self, scenario: Scenario) -> None:
        spec = scenario.task
        if spec.name != "digits-logreg":
            raise scenario_error(
                scenario.source,
                scenario.text,
                "training.path",
                f'"vectorized" trains only the digits-logreg task, not {spec.name!r}; '
                'use path = "task"',
            )
        torch.set_num_threads(1)
        self.task = load_scenario_task(scenario)
        self.primary_metric = self.task.primary_metric
        self.higher_is_better = self.task.higher_is_better
        self.ops = VectorOps()
        self._seed = scenario.seed
        self._stream: tuple[int, ...] = ()
        self._n_nodes = spec.nodes
        config = self.task.config
        self._lr, self._batch, self._decay = config.lr, config.batch_size, config.weight_decay
        state = self.task.make_model().state_dict()
        self._initial = np.concatenate(
            [state["linear.weight"].numpy().ravel(), state["linear.bias"].numpy()]
        ).astype(np.float32)
        self._classes, self._inputs = state["linear.weight"].shape
        central = self.task.central_data()
        x_test, y_test = central.test_set.tensors
        self._test = (x_test.numpy(), y_test.numpy())
        self._data: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}
        self._calls = 0
        self.label_flipped: frozenset[int] = frozenset()
        """Nodes that train on flipped labels (a label-flip attack, ``learning.attacks``)."""

    def _node_data(self, node: int | None) -> tuple[np.ndarray, np.ndarray]:
        if node not in self._data:
            data = (
                self.task.central_data()
                if node is None
                else self.task.node_data(node, self._n_nodes)
            )
            x, y = data.train_set.tensors
            self._data[node] = (x.numpy(), y.numpy())
        x, y = self._data[node]
        if node in self.label_flipped:
            return x, self._classes - 1 - y
        return x, y

    def use_stream(self, name: str) -> None:
        """Training shuffles from the stream ``name`` (see ``Task.use_stream``)."""
        self._stream = (stream_seed(self._seed, name),)
        self._calls = 0

    def initial(self) -> Vector:
        return self._initial

    def _logits(self, params: Vector, x: np.ndarray) -> np.ndarray:
        split = self._classes * self._inputs
        weight = params[:split].reshape(self._classes, self._inputs)
        return x @ weight.T + params[split:]  # type: ignore[no-any-return]

    def train(
        self,
        node: int | None,
        weights: Vector,
        epochs: float,
        *,
        lr_scale: float = 1.0,
        optimizer_state: dict[str, Any] | None = None,
    ) -> tuple[Vector, VectorReport]:
        x, y = self._node_data(node)
        n = len(y)
        steps = max(1, math.ceil(epochs * math.ceil(n / self._batch)))
        self._calls += 1
        rng = np.random.default_rng(
            [self._seed, 0 if node is None else node + 1, self._calls, *self._stream]
        )
        params = weights.astype(np.float32, copy=True)
        lr = self._lr * lr_scale
        if optimizer_state:  # Adam's moments and step count from this node's last training
            m, v, done = optimizer_state["m"], optimizer_state["v"], optimizer_state["step"]
        else:
            m, v, done = np.zeros_like(params), np.zeros_like(params), 0
        order, position, samples, loss_sum = np.empty(0, dtype=np.int64), 0, 0, 0.0
        split = self._classes * self._inputs
        for step in range(done + 1, done + steps + 1):
            if position >= len(order):
                order, position = rng.permutation(n), 0
            idx = order[position : position + self._batch]
            position += self._batch
            xb, yb = x[idx], y[idx]
            logits = self._logits(params, xb)
            logits -= logits.max(axis=1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=1, keepdims=True)
            rows = np.arange(len(yb))
            loss_sum += float(-np.log(prob[rows, yb] + 1e-30).sum())
            samples += len(yb)
            prob[rows, yb] -= 1.0  # d(mean CE)/d(logits) = (softmax - onehot) / batch
            prob /= len(yb)
            grad = np.empty_like(params)
            grad[:split] = (prob.T @ xb).ravel()
            grad[split:] = prob.sum(axis=0)
            if self._decay:
                grad += self._decay * params
            m = _BETA1 * m + (1 - _BETA1) * grad
            v = _BETA2 * v + (1 - _BETA2) * grad * grad
            denom = np.sqrt(v) / math.sqrt(1 - _BETA2**step) + _EPS
            params -= (lr / (1 - _BETA1**step)) * m / denom
        if optimizer_state is not None:
            optimizer_state.update(m=m, v=v, step=done + steps)
        return params, VectorReport(samples=samples, loss=loss_sum / max(samples, 1))

    def evaluate(self, weights: Vector, node: int | None = None) -> dict[str, float]:
        del node  # one shared test set: every node scores the same way
        x, y = self._test
        logits = self._logits(weights, x).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return {
            "accuracy": float((logits.argmax(axis=1) == y).mean()),
            "loss": float(-log_prob[np.arange(len(y)), y].mean()),
        }

    def nbytes(self, weights: Vector) -> int:
        return int(weights.nbytes)

    def feature_plan(self, node: int, node_ids: Sequence[str]) -> FeaturePlan | None:
        return None

    def use_features(self, node: int, peer: str, sensors: tuple[int, ...], data: bytes) -> None:
        raise ValueError(f"{self.task.name} has no node features (no plan asks for them)")
