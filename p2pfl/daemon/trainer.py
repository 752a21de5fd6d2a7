"""The daemon's side of the learning core's Executor: one node's data, immutable handles.

The driver trains and evaluates state_dicts that are never changed after creation (the protocol
machines assume so); the :class:`p2pfl.ml.Executor` runs each job off the event loop, in a worker
thread or a worker process (``[executor] mode``), one job at a time. The first step is paid in
:meth:`NodeTrainer.warm_up`, before the daemon reports READY: it pages in torch's kernels (on CPU
without torch._dynamo: see p2pfl.ml.adam) or starts the worker process.

The learning setup's training keys are applied here, as the virtual engine applies them: the
learning rate of each training is the task's times ``LearningSetup.lr_scale`` of the trainings
done so far (of ``max_rounds`` planned; counted across restarts through the checkpoint), and with
``keep_optimizer`` one Adam state carries over from each training to the next (in either executor
mode; a restarted daemon starts fresh moments, as a churned virtual node does).
"""

from __future__ import annotations

from typing import Any

import torch

from p2pfl.learning.setup import LearningSetup
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
        setup: LearningSetup | None = None,
        trainings_done: int = 0,
    ) -> None:
        self.task = task
        self.data = task.node_data(node_index, task.n_nodes)
        self.executor = Executor(task, device=device, threads=threads, mode=mode)
        self.setup = setup
        self.trainings = trainings_done
        """Local trainings this node has done, earlier sessions included: the schedule's step."""
        keep = setup is not None and setup.keep_optimizer
        self.optimizer_state: dict[str, Any] | None = {} if keep else None
        self.last_lr_scale: float | None = None
        self.last_steps = 0
        self.session_steps = 0
        self.kept_steps: int | None = None

    def initial(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self.task.make_model().state_dict().items()}

    def warm_up(self) -> None:
        self.executor.warm_up(self.data)

    def lr_scale(self) -> float:
        """The factor on the task's learning rate for the next training."""
        return 1.0 if self.setup is None else self.setup.lr_scale(self.trainings)

    async def train(self, weights: StateDict, epochs: float) -> tuple[StateDict, TrainReport]:
        scale = self.lr_scale()
        trained, report = await self.executor.train(
            weights, self.data, epochs=epochs, lr_scale=scale, optimizer_state=self.optimizer_state
        )
        self.trainings += 1
        self.last_lr_scale = scale
        self.last_steps = report.steps
        self.session_steps += report.steps
        if self.optimizer_state:  # read here, between jobs: a running job rewrites it
            steps = [float(s["step"]) for s in self.optimizer_state["state"].values()]
            self.kept_steps = int(max(steps, default=0.0))
        return trained, report

    def status(self) -> dict[str, Any]:
        """For ``p2pfl status``: trainings done (earlier sessions included), the learning-rate
        factor and optimizer steps of the last one, the steps of this session, and with
        keep_optimizer the steps the kept Adam moments have seen (this session's, if kept)."""
        return {
            "trainings": self.trainings,
            "lr_scale": self.last_lr_scale,
            "last_steps": self.last_steps,
            "session_steps": self.session_steps,
            "optimizer_steps": self.kept_steps,
        }

    async def evaluate(self, weights: StateDict) -> dict[str, float]:
        scores = await self.executor.evaluate(weights, self.data)
        return {k: float(v) for k, v in scores.items()}

    def close(self) -> None:
        self.executor.close()
