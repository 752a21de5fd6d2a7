"""The daemon's side of the learning core's Executor: one node's data, immutable handles.

The driver trains and evaluates state_dicts that are never changed after creation (the protocol
machines assume so); the :class:`p2pfl.ml.Executor` runs each job off the event loop, in a worker
thread or a worker process (``[executor] mode``), one job at a time. The first step is paid in
:meth:`NodeTrainer.warm_up`, before the daemon reports READY: it pages in torch's kernels (on CPU
without torch._dynamo: see p2pfl.ml.adam) or starts the worker process.
"""

from __future__ import annotations

from typing import Any

import torch

from p2pfl.ml import Executor, Task, TrainReport

StateDict = dict[str, torch.Tensor]


class NodeTrainer:
    def __init__(
        self,
        task: Task,
        node_index: int,
        *,
        device: str = "cpu",
        threads: int = 1,
        mode: Any = "thread",
    ) -> None:
        self.task = task
        self.data = task.node_data(node_index, task.n_nodes)
        self.executor = Executor(task, device=device, threads=threads, mode=mode)

    def initial(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self.task.make_model().state_dict().items()}

    def warm_up(self) -> None:
        self.executor.warm_up(self.data)

    async def train(self, weights: StateDict, epochs: float) -> tuple[StateDict, TrainReport]:
        return await self.executor.train(weights, self.data, epochs=epochs)

    async def evaluate(self, weights: StateDict) -> dict[str, float]:
        scores = await self.executor.evaluate(weights, self.data)
        return {k: float(v) for k, v in scores.items()}

    def close(self) -> None:
        self.executor.close()
