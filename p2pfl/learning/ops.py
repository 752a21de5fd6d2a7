"""Model operations a learner needs, over the learning core's tasks: shared by daemon and engines.

A ``Workload`` owns the task, the data of every node and the models as handles: it trains a
handle for a node (real training, synchronous), evaluates a handle, and sizes it for the network
model. ``StateDictOps`` is the ``ModelOps`` the protocol machines get: validation and aggregation
by the learning core's primitives (``validate_update``, ``AGGREGATORS``) over state_dicts; the
daemon uses it as is. :func:`feature_plan` tells a graph task's node which halo readings to ask
of whom, what it serves and how a reply is checked; the daemon and the virtual engine build
their plans with it.

Graph tasks follow one recipe in the daemon and the engines: a cloudlet trains on the task
:func:`node_task` builds for it (its own sensors' readings only, z-scored with their training
statistics) and on the halo readings its owners sent, stored by a
:class:`~p2pfl.learning.features.HaloStore`. A daemon builds its task with :func:`node_task`;
:class:`TaskWorkload` builds one per virtual cloudlet with the same call and stores what arrives
(``use_features``) through the same store.

Handles are never changed after creation: training copies, aggregators allocate their output.
That lets many nodes share one handle (FedAvg participants adopting the same global model) and
keeps per-node memory to the models a node actually holds.

This module imports neither ``p2pfl.daemon`` nor ``p2pfl.sim``: a scenario's task table reaches
it as any object with the fields of :class:`TaskSpecLike`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from p2pfl.ml import TrainConfig, load_task
from p2pfl.ml.aggregation import StateDictOps as StateDictOps
from p2pfl.ml.catalog import GRAPH_TASKS
from p2pfl.protocols import FeaturePlan

StateDict = dict[str, torch.Tensor]


class Report(Protocol):
    @property
    def samples(self) -> int: ...

    @property
    def loss(self) -> float: ...


class Workload(Protocol):
    primary_metric: str
    higher_is_better: bool
    ops: Any

    def initial(self) -> Any: ...

    def train(
        self,
        node: int | None,
        weights: Any,
        epochs: float,
        *,
        lr_scale: float = 1.0,
        optimizer_state: dict[str, Any] | None = None,
    ) -> tuple[Any, Report]:
        """Train a copy of ``weights`` on ``node``'s data (None: all data, centralized).

        The learning rate is the task's times ``lr_scale``; ``optimizer_state``, a dict the
        engine keeps per node, carries the optimizer's moments from one call to the next.
        """
        ...

    def evaluate(self, weights: Any, node: int | None = None) -> dict[str, float]:
        """Score ``weights`` as ``node`` does (a graph task's cloudlet: on its own sensors, as its
        daemon scores itself); None: on the whole task."""
        ...

    def nbytes(self, weights: Any) -> int: ...

    def feature_plan(self, node: int, node_ids: Sequence[str]) -> FeaturePlan | None: ...

    def use_stream(self, name: str) -> None:
        """Draw training shuffles from the stream ``name`` (one per setup of a scenario), so a
        setup's results do not depend on the setups run before it on this workload."""
        ...

    def use_features(self, node: int, peer: str, sensors: tuple[int, ...], data: bytes) -> None:
        """Store the halo readings ``peer`` sent ``node`` (the machine accepted them)."""
        ...


class TaskSpecLike(Protocol):
    """A scenario's ``[task]`` table as this module reads it (``p2pfl.sim.scenario.TaskSpec``)."""

    @property
    def name(self) -> str: ...
    @property
    def nodes(self) -> int: ...
    @property
    def partition(self) -> str: ...
    @property
    def alpha(self) -> float: ...
    @property
    def lr(self) -> float | None: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


class ScenarioLike(Protocol):
    @property
    def task(self) -> TaskSpecLike: ...
    @property
    def seed(self) -> int: ...


def build_task(
    name: str,
    *,
    n_nodes: int,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int | None = None,
    readings: Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """The learning core's task from the keys a daemon's [task] and a scenario's [task] share.

    ``lr``/``batch_size`` become the task's ``TrainConfig`` (unset: the task's default);
    ``readings`` is a graph task's file of real speed readings. Raises what ``load_task``
    raises: ValueError for a bad name or value, TypeError for an option the task does not take.
    """
    kwargs: dict[str, Any] = dict(options or {})
    if lr is not None or batch_size is not None:
        default = TrainConfig()
        kwargs["config"] = TrainConfig(
            lr=lr if lr is not None else default.lr,
            batch_size=batch_size if batch_size is not None else default.batch_size,
        )
    if readings is not None:
        kwargs["readings"] = readings
    return load_task(name, n_nodes=n_nodes, partition=partition, alpha=alpha, seed=seed, **kwargs)


def is_graph_task(name: str) -> bool:
    """Tasks with one node per cloudlet of a sensor graph (halo readings from the owners)."""
    return name in GRAPH_TASKS


def node_task(
    name: str,
    node: int,
    *,
    n_nodes: int,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int | None = None,
    readings: Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """The task node ``node`` of a deployment trains on: the daemon's and the engines' recipe.

    Graph tasks: the cloudlet's view (``cloudlet=node``), its own sensors' readings only,
    z-scored with their statistics; its halo stays masked until its owners' readings are stored
    (:class:`~p2pfl.learning.features.HaloStore`). Other tasks: the whole task (the node picks
    its share with ``node_data``). Raises what :func:`build_task` raises.
    """
    extra: dict[str, Any] = dict(options or {})
    if is_graph_task(name):
        if "cloudlet" in extra:
            raise TypeError("a node's cloudlet is its node index, not an option ('cloudlet')")
        extra["cloudlet"] = node
    return build_task(
        name,
        n_nodes=n_nodes,
        partition=partition,
        alpha=alpha,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        readings=readings,
        options=extra,
    )


def load_scenario_task(scenario: ScenarioLike) -> Any:
    """The learning core's task for a scenario's [task] table (lr/batch_size -> TrainConfig)."""
    spec = scenario.task
    return build_task(
        spec.name,
        n_nodes=spec.nodes,
        partition=spec.partition,
        alpha=spec.alpha,
        seed=scenario.seed,
        lr=spec.lr,
        batch_size=spec.batch_size,
        options=spec.options,
    )


def feature_plan(
    task: Any, node: int, node_ids: Sequence[str], *, timeout: float = 30.0
) -> FeaturePlan | None:
    """Graph tasks: the halo readings cloudlet ``node`` needs, by owner, what it serves, and the
    check a reply must pass (see :mod:`p2pfl.learning.features`). None for other tasks."""
    from p2pfl.learning.features import feature_plan as plan

    return plan(task, node, node_ids, timeout=timeout)


def _frozen_copy(state: dict[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


class TaskWorkload:
    """A learning-core ``Task``: one shared module is loaded with a handle, trained, copied out.

    Graph tasks: each node trains on its own :func:`node_task`, as a daemon does, and its halo
    comes from what its owners' replies carry (``use_features``); evaluation and the centralized
    baseline use the whole task.
    """

    def __init__(self, scenario: ScenarioLike, *, threads: int = 1) -> None:
        # Tiny models, one process: one intra-op thread is fastest, and on a shared machine
        # torch's spinning worker threads made a 4-batch MLP epoch 20x slower (measured).
        torch.set_num_threads(threads)
        self.task = load_scenario_task(scenario)
        self.primary_metric = self.task.primary_metric
        self.higher_is_better = self.task.higher_is_better
        self.ops = StateDictOps()
        self._scenario = scenario
        self._n_nodes = scenario.task.nodes
        self._graph = is_graph_task(scenario.task.name)
        self._model = self.task.make_model()
        self._initial = _frozen_copy(self._model.state_dict())
        self._data: dict[tuple[int | None, bool], Any] = {}
        self._tasks: dict[int, Any] = {}
        self._halos: dict[int, Any] = {}
        self._stream: str | None = None
        self.label_flipped: frozenset[int] = frozenset()
        """Nodes that train on flipped labels (a label-flip attack, ``learning.attacks``)."""

    def node_task(self, node: int | None) -> Any:
        """The task ``node`` trains on (None: the centralized baseline's, the whole task)."""
        if node is None or not self._graph:
            return self.task
        if node not in self._tasks:
            spec = self._scenario.task
            task = node_task(
                spec.name,
                node,
                n_nodes=spec.nodes,
                partition=spec.partition,
                alpha=spec.alpha,
                seed=self._scenario.seed,
                lr=spec.lr,
                batch_size=spec.batch_size,
                options=spec.options,
            )
            if self._stream is not None:
                task.use_stream(self._stream)
            self._tasks[node] = task
        return self._tasks[node]

    def _node_data(self, node: int | None) -> Any:
        key = (node, node in self.label_flipped)
        if key not in self._data:
            if node is None:
                self._data[key] = self.task.central_data()
            elif key[1]:
                from p2pfl.learning.attacks import flip_labels

                self._data[key] = flip_labels(self._node_data_honest(node))
            else:
                self._data[key] = self._node_data_honest(node)
        return self._data[key]

    def _node_data_honest(self, node: int) -> Any:
        if (node, False) not in self._data:
            self._data[(node, False)] = self.node_task(node).node_data(node, self._n_nodes)
        return self._data[(node, False)]

    def initial(self) -> StateDict:
        return self._initial

    def train(
        self,
        node: int | None,
        weights: StateDict,
        epochs: float,
        *,
        lr_scale: float = 1.0,
        optimizer_state: dict[str, Any] | None = None,
    ) -> tuple[StateDict, Report]:
        self._model.load_state_dict(weights)
        report = self.node_task(node).train(
            self._model,
            self._node_data(node),
            epochs=epochs,
            lr_scale=lr_scale,
            optimizer_state=optimizer_state,
        )
        return _frozen_copy(self._model.state_dict()), report

    def evaluate(self, weights: StateDict, node: int | None = None) -> dict[str, float]:
        self._model.load_state_dict(weights)
        if node is None or not self._graph:
            scores = self.task.evaluate(self._model)
        else:
            # What the node's daemon reports: its own sensors' test windows, with the halo its
            # owners sent, scaled by its own statistics (daemon/trainer.py evaluates self.data).
            scores = self.node_task(node).evaluate(self._model, self._node_data_honest(node))
        return {k: float(v) for k, v in scores.items()}

    def nbytes(self, weights: StateDict) -> int:
        return sum(t.numel() * t.element_size() for t in weights.values())

    def use_stream(self, name: str) -> None:
        self._stream = name
        self.task.use_stream(name)
        for task in self._tasks.values():
            task.use_stream(name)

    def feature_plan(self, node: int, node_ids: Sequence[str]) -> FeaturePlan | None:
        """The node's plan from its own task (it serves its own sensors' readings), and a halo
        store for what its owners send. Called for every new machine (a setup's start, a
        rejoining node): graph tasks rebuild the node's task first, so its halo is masked until
        its owners answer again, as for a daemon that starts from its own file."""
        if self._graph:
            self._tasks.pop(node, None)
            self._data.pop((node, False), None)
            self._data.pop((node, True), None)
        plan = feature_plan(self.node_task(node), node, node_ids)
        if plan is not None and self._graph:
            from p2pfl.learning.features import HaloStore

            def use(data: Any, node: int = node) -> None:
                self._data[(node, False)] = data  # the node's next training runs on it
                self._data.pop((node, True), None)

            self._halos[node] = HaloStore(self.node_task(node), node, plan, use)
        return plan

    def use_features(self, node: int, peer: str, sensors: tuple[int, ...], data: bytes) -> None:
        store = self._halos.get(node)
        if store is None:
            raise ValueError(f"node {node} asked for no halo readings")
        store.use(peer, sensors, data)
