"""The tasks by name: :func:`load_task` builds any task of :data:`TASKS`.

Kept apart from ``task`` (the ``Task`` contract and the digits tasks) and ``forecast`` (the
traffic tasks) so that both can be imported without the other and the imports have no cycle.
The traffic module is imported only when a traffic task is asked for, so a digits node never
loads the graph and forecasting code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pfl.ml.task import Task

__all__ = ["GRAPH_TASKS", "TASKS", "load_task", "partition_problem"]

GRAPH_TASKS = ("traffic-metr-la", "traffic-pems-bay")
"""One node per cloudlet of a sensor graph: their nodes are the cloudlets, not a partition."""
TASKS = ("digits", "digits-logreg", *GRAPH_TASKS)
"""Every task by name; importing this module imports no torch (the tasks load in load_task)."""


def partition_problem(name: str, partition: str) -> str | None:
    """Why task ``name`` cannot be split by ``partition`` (None: it can): a graph task's nodes
    are its cloudlets. Scenarios, daemon configurations and :func:`load_task` ask it."""
    if name in GRAPH_TASKS and partition != "iid":
        return (
            f"the nodes of {name} are its cloudlets, each with its own sensors; remove "
            "partition (and alpha)"
        )
    return None


def load_task(
    name: str,
    *,
    n_nodes: int,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    **options: Any,
) -> Task:
    """The task called ``name`` (one of :data:`TASKS`) for ``n_nodes`` nodes.

    Options: digits take ``config`` (TrainConfig). Traffic tasks take those of
    :class:`~p2pfl.ml.forecast.TrafficTask` (``days``, ``readings``, ``graph``, ``config``,
    ``speed_model``, ``model_config``, ``hops``, ``range_km``); their nodes are the cloudlets,
    so ``partition`` does not apply to them (any but "iid" is refused).
    """
    if name in ("digits", "digits-logreg"):
        from p2pfl.ml.task import DigitsTask

        model = "mlp" if name == "digits" else "logreg"
        return DigitsTask(
            n_nodes=n_nodes, partition=partition, alpha=alpha, seed=seed, model=model, **options
        )
    if name in GRAPH_TASKS:
        if (problem := partition_problem(name, partition)) is not None:
            raise ValueError(f"partition {partition!r}: {problem}")
        from p2pfl.ml.forecast import TrafficTask  # only for traffic nodes: see the docstring

        return TrafficTask(
            graph=options.pop("graph", name.removeprefix("traffic-")),
            n_nodes=n_nodes,
            seed=seed,
            name=name,
            **options,
        )
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
