"""The executor: runs a task's train/evaluate jobs without blocking the trio event loop.

Every job is awaited through ``trio.to_thread.run_sync`` behind a ``CapacityLimiter`` (one job
at a time by default) and hands back a copy of the new weights with a
:class:`~p2pfl.ml.train.TrainReport` (wall time, samples/s, energy where measurable). Where the
torch work itself runs is the ``mode``:

- ``"thread"``: in the worker thread. ``torch.set_num_threads`` is called inside that thread
  at the start of every job (in a fresh thread torch otherwise ran 2-3x slower here). Models
  are kept between jobs and loaded with each job's weights.
- ``"process"``: in one spawned worker process per executor, which receives the task once and
  each node's data once (tensors through shared memory); the weights travel both ways through
  one shared-memory state_dict that the parent writes and the child loads into the one model
  it keeps, trains and writes back. The worker thread only waits on a queue. Starting it costs
  seconds (spawn, import torch, warm-up) and the child's memory; ``close()`` (or ``with``) ends
  it.

Why ``"thread"`` is the default, from ``benchmarks/bench_executor.py`` on this 2-core machine
(1 torch thread; a loopback aiortc data-channel transfer, both ends, 64 KiB messages, in the same
process inside a private network namespace; medians of 3 interleaved runs), re-measured
2026-11-30 for issue 16 with the shipped task sizes while other jobs kept the load average at 5-7:

=========================  ===================  ===================  ==============
workload                   thread + transfer    process + transfer   transfer alone
=========================  ===================  ===================  ==============
digits MLP, 10 epochs      2,466 /s, 0.5 MB/s   2,707 /s, 0.6 MB/s   1.3 MB/s
STGCN cloudlet, 1/4 epoch  1,067 /s, 1.2 MB/s   1,129 /s, 1.1 MB/s   1.6 MB/s
=========================  ===================  ===================  ==============

(samples/s of training, MB/s of the transfer.) The process trained 1.10x (MLP) and 1.06x (STGCN)
as fast as the thread during a transfer, and moved the transfer 1.07x / 0.91x as fast: within
the spread of single runs here (up to 1.3x). Earlier sittings went both ways: 1.32x for the
process under four other jobs, 0.98x on a quiet machine, and 11x on a quiet one in the issue's
report. Against that, each worker process costs 6-7 s to start (spawn, import torch, warm-up:
"worker process ready in 7.0 s" in the same run) and a second torch in memory per daemon (the
processes engine runs ten daemons on this machine), and outlives a SIGKILLed daemon. With ten
daemons (``benchmarks/bench_rounds.py``) a client spent 13 ms of CPU per round in its training
thread against 22 ms in its aiortc thread, and the aggregator's aiortc thread was busy 92 ms of a
540 ms round: the GIL was not what held rounds back; the cores were. So ``"thread"`` stays the
default; ``"process"`` stays for a node whose training is long enough for the worker's start-up
to pay off and whose CPU is contended.

Overhead over a bare torch loop (``benchmarks/bench_ml.py``: the digits MLP, 6 epochs, the same
optimizer arithmetic as ``fit``, weights in and trained weights out; 21 interleaved repeats, each
job's time divided by the bare loop's of the same repeat, median), four runs on 2026-11-30 at load
average 7-10 (the fourth 3-5): thread -2.9 % / -0.6 % / -0.5 % / -2.1 % by wall time (-2.2 % / -0.3
% / +4.7 % / -6.1 % by CPU time), process -5.8 % / +3.7 % / +1.6 % / -0.6 % (-6.5 % / +4.1 % / +2.1
% / -1.2 %). Under that load single repeats spread by +-15-20 %, so these place the overhead within
the 5 % target, not to the per cent. What a thread job adds by construction, measured alone: it
loads the weights into a model kept from the previous job (0.16 ms), copies the trained weights out
(0.08 ms) and pays ``fit``'s set-up (optimizer, shuffle generator): about 0.5 ms CPU per job,
against ~1.2 ms per training step of this MLP; per step, ``fit`` adds the batch hand-off and the
loss bookkeeping, ~5 us. Before issue 16's part 4 a job built a new model (1.1 ms:
``torch.manual_seed`` seeds every device's generator and records a stack trace for each) and ``fit``
spent two tensor operations per step on its loss sum (30 us, 2.4 % of a step): about 3 points of the
+8 % measured then, the rest being the machine's load. A one-batch job costs 2-8 ms (thread) and 3-9
ms (process) end to end at that load.

Call :meth:`Executor.warm_up` once before the event loop gets busy: the first training step of
a process pages in torch's kernels and, on a loaded machine, held the GIL for up to a second in
thread mode; afterwards the loop lag during training stayed at a few ms
(tests/ml/test_executor.py measures it). In process mode it waits for the child to start.
"""

from __future__ import annotations

import queue
import threading
import traceback
from typing import Any, Literal

import torch
import trio

from p2pfl.ml.aggregation import StateDict
from p2pfl.ml.task import NodeData, Task
from p2pfl.ml.train import TrainReport

__all__ = ["Executor", "ExecutorError"]

Mode = Literal["thread", "process"]


def device_problem(device: str) -> str | None:
    """What is wrong with training on ``device`` here (None: nothing): it must be a torch
    device of type cpu or cuda, and a cuda device one torch sees."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"{device!r} is not a torch device; use cpu, cuda or cuda:N"
    if kind not in ("cpu", "cuda"):
        return f"device {device!r}: training runs on cpu or cuda (cuda:N)"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"device {device!r} requested but torch sees no CUDA device; use cpu"
    return None


class ExecutorError(RuntimeError):
    """A job failed in the worker process; the message carries the child's traceback."""


def _serve(
    task: Task, threads: int, device: str, shared: StateDict, jobs: Any, results: Any, stop: Any
) -> None:
    """Worker-process main loop: one job at a time from ``jobs``, answers on ``results``."""
    torch.set_num_threads(threads)
    data_by_id: dict[int, NodeData] = {}
    model = task.make_model().to(device)  # one job at a time: one model, reloaded per job
    while (job := jobs.get()) is not None:
        kind, data_id, data, epochs, lr_scale, optimizer_state = job
        try:
            if data is not None:
                data_by_id[data_id] = data
            node_data = None if data_id is None else data_by_id[data_id]
            model.load_state_dict(shared)
            if kind == "train":
                assert node_data is not None
                report = task.train(
                    model,
                    node_data,
                    epochs=epochs,
                    device=device,
                    should_stop=stop.is_set,
                    lr_scale=lr_scale,
                    optimizer_state=optimizer_state,
                )
                with torch.no_grad():
                    for key, value in model.state_dict().items():
                        shared[key].copy_(value)
                results.put(("ok", (report, optimizer_state)))
            else:
                results.put(("ok", task.evaluate(model, node_data, device=device)))
        except Exception:
            results.put(("error", traceback.format_exc()))


class _WorkerProcess:
    """The spawned child of a process-mode executor and the parent's side of its queues."""

    def __init__(self, task: Task, threads: int, device: str) -> None:
        import torch.multiprocessing as mp

        context = mp.get_context("spawn")
        self.shared = {
            k: v.clone().share_memory_() for k, v in task.make_model().state_dict().items()
        }
        self.jobs, self.results = context.Queue(), context.Queue()
        self.stop = context.Event()  # set by the parent to end a training job at the next step
        self.process = context.Process(
            target=_serve,
            args=(task, threads, device, self.shared, self.jobs, self.results, self.stop),
            name=f"p2pfl-executor-{task.name}",
            daemon=True,
        )
        self.process.start()
        self._sent: dict[int, NodeData] = {}  # data the child already holds, by id
        self._lock = threading.Lock()

    def run(
        self,
        kind: str,
        weights: StateDict,
        data: NodeData | None,
        epochs: float,
        cancelled: threading.Event | None = None,
        lr_scale: float = 1.0,
        optimizer_state: dict[str, Any] | None = None,
    ) -> Any:
        with self._lock:  # one job at a time: the shared weights are one buffer
            self.stop.clear()
            if cancelled is not None and cancelled.is_set():  # cancelled before we got here
                self.stop.set()
            with torch.no_grad():
                for key, value in weights.items():
                    self.shared[key].copy_(value)
            data_id = id(data) if data is not None else None
            fresh = data is not None and data_id not in self._sent
            if fresh:
                assert data is not None and data_id is not None
                self._sent[data_id] = data  # also keeps the id from being reused
            # A kept optimizer state travels to the child and back with each job (torch's queues
            # pass its tensors through shared memory): the caller's dict holds it, as in a thread.
            job = (kind, data_id, data if fresh else None, epochs, lr_scale, optimizer_state)
            self.jobs.put(job)
            status, payload = self._wait()
            if status != "ok":
                raise ExecutorError(f"job {kind!r} failed in the worker process:\n{payload}")
            if kind == "train":
                report, state = payload
                if optimizer_state is not None:
                    optimizer_state.clear()
                    optimizer_state.update(state)
                return {k: v.clone() for k, v in self.shared.items()}, report
            return payload

    def _wait(self) -> tuple[str, Any]:
        """The child's answer; ExecutorError if the child dies first (never waits forever)."""
        while True:
            try:
                answer: tuple[str, Any] = self.results.get(timeout=0.5)
                return answer
            except queue.Empty:
                if not self.process.is_alive():
                    raise ExecutorError(
                        f"the worker process exited (code {self.process.exitcode}) during a job; "
                        "see its output above, then create a new Executor"
                    ) from None

    def close(self) -> None:
        if self.process.is_alive():
            self.jobs.put(None)
            self.process.join(10)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)


class Executor:
    """Train/evaluate jobs for one task, on ``device``, ``threads`` torch threads per job.

    ``limiter`` bounds concurrent jobs; share one limiter between executors to bound the whole
    process (the default allows one job at a time). ``mode`` is "process" or "thread" (see the
    module docstring). Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        task: Task,
        *,
        device: str = "cpu",
        threads: int = 1,
        limiter: trio.CapacityLimiter | None = None,
        mode: Mode = "thread",
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if (problem := device_problem(device)) is not None:
            raise ValueError(problem)
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process', got {mode!r}")
        self.task = task
        self.device = device
        self.threads = threads
        self.mode = mode
        self.limiter = limiter or trio.CapacityLimiter(1)
        self._worker = _WorkerProcess(task, threads, device) if mode == "process" else None
        self._models: list[torch.nn.Module] = []  # idle models of thread mode, one per job

    @property
    def worker_pid(self) -> int | None:
        """Process id of the worker process (process mode), else None."""
        return self._worker.process.pid if self._worker is not None else None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the worker process (process mode); idempotent."""
        if self._worker is not None:
            self._worker.close()

    def warm_up(self, data: NodeData) -> None:
        """Run one training step on a throwaway model, in the calling thread (or the child)."""
        if self._worker is not None:
            self._worker.run("train", self.task.make_model().state_dict(), data, 1e-9)
            return
        torch.set_num_threads(self.threads)
        model = self._model(None)
        try:
            self.task.train(model, data, epochs=1e-9, device=self.device)  # one batch
        finally:
            self._models.append(model)

    def _model(self, weights: StateDict | None) -> torch.nn.Module:
        """An idle model holding ``weights``; give it back to ``_models`` when the job ends.

        Models are kept between jobs (building one cost ~1 ms, a tenth of a small job) and
        reloaded from the job's weights: ``load_state_dict`` sets every parameter and buffer,
        so a job's result does not depend on which model it got (the virtual engine reuses one
        model the same way). Jobs that overlap (a limiter shared with capacity > 1) get their
        own models; list pop/append are atomic.
        """
        torch.set_num_threads(self.threads)  # per worker thread; see the module docstring
        try:
            model = self._models.pop()
        except IndexError:
            model = self.task.make_model().to(self.device)
        if weights is not None:
            model.load_state_dict(weights)
        return model

    def _train_job(
        self,
        weights: StateDict,
        data: NodeData,
        epochs: float,
        stop: threading.Event,
        lr_scale: float,
        optimizer_state: dict[str, Any] | None,
    ) -> tuple[StateDict, TrainReport]:
        if self._worker is not None:
            trained, report = self._worker.run(
                "train", weights, data, epochs, stop, lr_scale, optimizer_state
            )
            return trained, report
        model = self._model(weights)
        try:
            report = self.task.train(
                model,
                data,
                epochs=epochs,
                device=self.device,
                should_stop=stop.is_set,
                lr_scale=lr_scale,
                optimizer_state=optimizer_state,
            )
            trained = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        finally:
            self._models.append(model)
        return trained, report

    def _evaluate_job(self, weights: StateDict, data: NodeData | None) -> dict[str, float]:
        if self._worker is not None:
            metrics: dict[str, float] = self._worker.run("evaluate", weights, data, 0.0)
            return metrics
        model = self._model(weights)
        try:
            return self.task.evaluate(model, data, device=self.device)
        finally:
            self._models.append(model)

    async def train(
        self,
        weights: StateDict,
        data: NodeData,
        *,
        epochs: float,
        lr_scale: float = 1.0,
        optimizer_state: dict[str, Any] | None = None,
    ) -> tuple[StateDict, TrainReport]:
        """Train from ``weights`` on ``data``: (new weights on CPU, report). Inputs unchanged.

        The learning rate is the task's times ``lr_scale``; ``optimizer_state`` (a dict the
        caller keeps, in either mode) carries Adam's moments from one job to the next, as in
        :func:`p2pfl.ml.train.fit`.

        Cancelling the caller returns at once and tells the job to stop at its next optimizer
        step; the limiter's token stays held until the worker is really done (trio keeps it
        for an abandoned thread), so a cancelled job never overlaps the next one uncounted.
        """
        stop = threading.Event()
        try:
            return await trio.to_thread.run_sync(
                self._train_job,
                weights,
                data,
                epochs,
                stop,
                lr_scale,
                optimizer_state,
                limiter=self.limiter,
                abandon_on_cancel=True,
            )
        except trio.Cancelled:
            stop.set()
            if self._worker is not None:
                self._worker.stop.set()
            raise

    async def evaluate(self, weights: StateDict, data: NodeData | None = None) -> dict[str, float]:
        return await trio.to_thread.run_sync(
            self._evaluate_job, weights, data, limiter=self.limiter
        )
