"""The executor: runs a task's train/evaluate jobs without blocking the trio event loop.

Each job runs in a worker thread (``trio.to_thread.run_sync``) behind a ``CapacityLimiter``
(one job at a time by default), builds a model, loads the given weights, runs the task and
hands back a copy of the new weights with a :class:`~p2pfl.ml.train.TrainReport` (wall time,
samples/s, energy where measurable). ``torch.set_num_threads`` is called inside the worker
thread at the start of every job: in a fresh thread torch otherwise ran 2-3x slower here.

Call :meth:`Executor.warm_up` once before the event loop gets busy: the first training step
of a process pages in torch's kernels (hundreds of MB of libtorch) and, on a loaded machine,
held the GIL for up to a second while the worker thread waited on the disk; afterwards the loop
lag during training stayed at a few ms (tests/ml/test_executor.py measures it).

The daemon sees only this class, so the choice between a worker thread and a worker process
can change without touching callers.
"""

from __future__ import annotations

import torch
import trio

from p2pfl.ml.aggregation import StateDict
from p2pfl.ml.task import NodeData, Task
from p2pfl.ml.train import TrainReport

__all__ = ["Executor"]


class Executor:
    """Train/evaluate jobs for one task, on ``device``, ``threads`` torch threads per job.

    ``limiter`` bounds concurrent jobs; share one limiter between executors to bound the whole
    process (the default allows one job at a time).
    """

    def __init__(
        self,
        task: Task,
        *,
        device: str = "cpu",
        threads: int = 1,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
        self.task = task
        self.device = device
        self.threads = threads
        self.limiter = limiter or trio.CapacityLimiter(1)

    def warm_up(self, data: NodeData) -> None:
        """Run one training step on a throwaway model, in the calling thread."""
        torch.set_num_threads(self.threads)
        model = self.task.make_model()
        self.task.train(model, data, epochs=1e-9, device=self.device)  # one batch

    def _model(self, weights: StateDict) -> torch.nn.Module:
        torch.set_num_threads(self.threads)  # per worker thread; see the module docstring
        model = self.task.make_model()
        model.load_state_dict(weights)
        return model.to(self.device)

    def _train_job(
        self, weights: StateDict, data: NodeData, epochs: float
    ) -> tuple[StateDict, TrainReport]:
        model = self._model(weights)
        report = self.task.train(model, data, epochs=epochs, device=self.device)
        trained = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return trained, report

    def _evaluate_job(self, weights: StateDict, data: NodeData | None) -> dict[str, float]:
        return self.task.evaluate(self._model(weights), data, device=self.device)

    async def train(
        self, weights: StateDict, data: NodeData, *, epochs: float
    ) -> tuple[StateDict, TrainReport]:
        """Train from ``weights`` on ``data``: (new weights on CPU, report). Inputs unchanged."""
        return await trio.to_thread.run_sync(
            self._train_job, weights, data, epochs, limiter=self.limiter
        )

    async def evaluate(self, weights: StateDict, data: NodeData | None = None) -> dict[str, float]:
        return await trio.to_thread.run_sync(
            self._evaluate_job, weights, data, limiter=self.limiter
        )
