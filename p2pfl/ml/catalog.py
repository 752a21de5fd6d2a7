"""The tasks by name: :func:`load_task` builds any task of :data:`TASKS`.

Kept apart from ``task`` (the ``Task`` contract and the digits tasks) and ``forecast`` (the
traffic tasks) so that both can be imported without the other and the imports have no cycle.
The traffic module is imported only when a traffic task is asked for, so a digits node never
loads the graph and forecasting code.
"""

from __future__ import annotations

from typing import Any

from p2pfl.ml.task import DigitsTask, Task

__all__ = ["TASKS", "load_task"]

TASKS = ("digits", "digits-logreg", "traffic-metr-la", "traffic-pems-bay")


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
    so ``partition`` and ``alpha`` do not apply to them.
    """
    if name in ("digits", "digits-logreg"):
        model = "mlp" if name == "digits" else "logreg"
        return DigitsTask(
            n_nodes=n_nodes, partition=partition, alpha=alpha, seed=seed, model=model, **options
        )
    if name in ("traffic-metr-la", "traffic-pems-bay"):
        from p2pfl.ml.forecast import TrafficTask  # only for traffic nodes: see the docstring

        return TrafficTask(
            graph=options.pop("graph", name.removeprefix("traffic-")),
            n_nodes=n_nodes,
            seed=seed,
            name=name,
            **options,
        )
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
