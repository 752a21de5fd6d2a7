"""Torch work for the daemon, off the event loop: a learning-core Task in a worker thread.

Training and evaluation each own a module (so an evaluation never sees half-trained weights) and
share one ``CapacityLimiter(1)``: one torch job at a time, the event loop never blocks. Handles
are state_dicts that are never changed after creation (training copies in and out), as the
protocol machines assume. ``torch.set_num_threads`` is called in the worker thread itself: a
fresh thread otherwise ran up to 3x slower (DESIGN.md, measured facts).
"""

from __future__ import annotations

from typing import Any

import torch
import trio

from p2pfl.ml import Task, TrainReport

StateDict = dict[str, torch.Tensor]


def frozen_copy(state: dict[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


class TaskTrainer:
    def __init__(self, task: Task, node_index: int, *, device: str = "cpu", threads: int = 1):
        self.task = task
        self.device = device
        self.threads = threads
        self.data = task.node_data(node_index, task.n_nodes)
        self._train_model = task.make_model()
        self._eval_model = task.make_model()
        self.limiter = trio.CapacityLimiter(1)
        # The first optimizer imports torch._dynamo (seconds on a small CPU): pay it at start,
        # before READY, instead of inside the first training step.
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    def initial(self) -> StateDict:
        return frozen_copy(self._train_model.state_dict())

    def _threads(self) -> None:
        # Per thread, unconditionally: a fresh worker thread reports the setting but runs
        # slower until it sets it itself.
        torch.set_num_threads(self.threads)

    async def train(self, weights: StateDict, epochs: float) -> tuple[StateDict, TrainReport]:
        def work() -> tuple[StateDict, TrainReport]:
            self._threads()
            self._train_model.load_state_dict(weights)
            report = self.task.train(
                self._train_model, self.data, epochs=epochs, device=self.device
            )
            return frozen_copy(self._train_model.to("cpu").state_dict()), report

        # abandon_on_cancel: a SIGTERM during a step abandons it (the thread finishes on its
        # own, its result unused) instead of holding the shutdown hostage.
        return await trio.to_thread.run_sync(work, limiter=self.limiter, abandon_on_cancel=True)

    async def evaluate(self, weights: StateDict) -> dict[str, float]:
        def work() -> dict[str, float]:
            self._threads()
            self._eval_model.load_state_dict(weights)
            scores: dict[str, Any] = self.task.evaluate(
                self._eval_model, self.data, device=self.device
            )
            return {k: float(v) for k, v in scores.items()}

        return await trio.to_thread.run_sync(work, limiter=self.limiter, abandon_on_cancel=True)
