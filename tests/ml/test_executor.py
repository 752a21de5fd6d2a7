"""The executor keeps the trio loop responsive; the prefetching loop runs the same on CPU."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import trio

from p2pfl.ml import load_task
from p2pfl.ml.executor import Executor, ExecutorError
from p2pfl.ml.task import ClassificationData
from p2pfl.ml.train import TensorSamples, prefetch


async def _max_loop_lag(done: trio.Event, period: float = 0.005) -> list[float]:
    lags = []
    while not done.is_set():
        before = trio.current_time()
        await trio.sleep(period)
        lags.append(trio.current_time() - before - period)
    return lags


async def test_event_loop_stays_responsive_while_the_executor_trains() -> None:
    task = load_task("digits", n_nodes=1)
    executor = Executor(task, threads=1, mode="thread")
    executor.warm_up(task.central_data())
    weights = task.make_model().state_dict()
    done = trio.Event()
    result = {}

    async def job() -> None:
        result["out"] = await executor.train(weights, task.central_data(), epochs=12)
        done.set()

    lags: list[float] = []

    async def watch() -> None:
        lags.extend(await _max_loop_lag(done))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        nursery.start_soon(job)
    trained, report = result["out"]
    assert len(lags) > 20  # training took long enough to measure the lag
    assert report.samples == 12 * 1437
    assert max(lags) < 0.050, f"max loop lag {max(lags) * 1000:.1f} ms"
    assert not torch.equal(trained["net.0.weight"], weights["net.0.weight"])
    metrics = await executor.evaluate(trained)
    assert metrics["accuracy"] > 0.8


async def test_executor_leaves_the_given_weights_untouched() -> None:
    task = load_task("digits-logreg", n_nodes=2)
    weights = task.make_model().state_dict()
    before = {k: v.clone() for k, v in weights.items()}
    trained, report = await Executor(task, mode="thread").train(
        weights, task.node_data(0, 2), epochs=1
    )
    assert report.samples == task.node_data(0, 2).num_samples
    assert all(torch.equal(before[k], weights[k]) for k in weights)
    assert not torch.equal(trained["linear.weight"], weights["linear.weight"])


async def test_a_job_on_a_kept_model_equals_one_on_a_fresh_model() -> None:
    # The thread executor keeps its models between jobs; a job's result must not show it.
    first, second = (load_task("digits", n_nodes=2) for _ in range(2))
    data = first.node_data(0, 2)
    w1 = first.make_model().state_dict()
    w2 = {k: v + 0.01 for k, v in w1.items()}
    executor = Executor(first, mode="thread")
    executor.warm_up(data)
    await executor.train(w1, data, epochs=2)
    await executor.evaluate(w1, data)
    kept, kept_report = await executor.train(w2, data, epochs=2)
    assert len(executor._models) == 1  # the same model served all four
    second.train(second.make_model(), data, epochs=1e-9)  # as warm_up: the shuffle counter
    for weights in (w1, w2):  # the same calls on fresh models
        model = second.make_model()
        model.load_state_dict(weights)
        fresh_report = second.train(model, data, epochs=2)
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    assert kept_report.loss == fresh_report.loss and kept_report.steps == fresh_report.steps


async def test_cancelling_a_job_stops_the_worker_at_its_next_step() -> None:
    task = load_task("digits-logreg", n_nodes=1)
    executor = Executor(task, mode="thread")
    weights = task.make_model().state_dict()
    started = trio.current_time()
    with trio.move_on_after(0.3):
        await executor.train(weights, task.central_data(), epochs=100_000)
    assert trio.current_time() - started < 2.0
    # The limiter token is free again once the worker noticed the stop (the next step).
    with trio.fail_after(10):
        _, report = await executor.train(weights, task.central_data(), epochs=1)
    assert report.samples == 1437


def test_executor_refuses_cuda_when_torch_sees_none() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        Executor(load_task("digits-logreg", n_nodes=1), device="cuda", mode="thread")


def test_prefetch_reads_one_batch_ahead_and_keeps_order() -> None:
    # The copy path of CUDA (start the next copy before handing out the current batch) runs
    # unchanged on CPU: same batches, same order, exactly one batch of look-ahead.
    drawn: list[int] = []

    def source():  # type: ignore[no-untyped-def]
        for i in range(4):
            drawn.append(i)
            yield (torch.full((2,), float(i)),)

    seen = []
    for (batch,) in prefetch(source(), "cpu"):
        seen.append(int(batch[0]))
        assert len(drawn) == min(len(seen) + 1, 4)
    assert seen == [0, 1, 2, 3]
    assert list(prefetch(iter([]), "cpu")) == []


def test_fractional_epochs_run_the_matching_number_of_batches() -> None:
    samples = TensorSamples(torch.arange(100.0), torch.arange(100))
    batches = list(samples.batches(7, 32, torch.Generator().manual_seed(0)))
    assert [len(b[0]) for b in batches] == [32, 32, 32, 4, 32, 32, 32]
    first_epoch = torch.cat([b[1] for b in batches[:4]])
    assert sorted(first_epoch.tolist()) == list(range(100))
    started = time.perf_counter()
    task = load_task("digits-logreg", n_nodes=1)
    report = task.train(task.make_model(), task.central_data(), epochs=0.5)
    assert report.samples == 23 * 32 and report.wall_s <= time.perf_counter() - started


@pytest.mark.slow
async def test_process_mode_trains_through_shared_memory_and_reports_child_errors() -> None:
    task = load_task("digits-logreg", n_nodes=2)
    weights = task.make_model().state_dict()
    before = {k: v.clone() for k, v in weights.items()}
    with Executor(task, mode="process") as executor:
        executor.warm_up(task.node_data(0, 2))  # spawn + import torch in the child
        done = trio.Event()
        result = {}

        async def job() -> None:
            result["out"] = await executor.train(weights, task.node_data(0, 2), epochs=5)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(job)
            lags = await _max_loop_lag(done)
        trained, report = result["out"]
        assert max(lags) < 0.050
        assert report.samples == 5 * task.node_data(0, 2).num_samples
        assert all(torch.equal(before[k], weights[k]) for k in weights)
        assert not torch.equal(trained["linear.weight"], weights["linear.weight"])
        assert (await executor.evaluate(trained))["accuracy"] > 0.8
        wrong = ClassificationData(
            TensorSamples(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)),
            TensorSamples(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)),
        )
        with pytest.raises(ExecutorError, match="failed in the worker process"):
            await executor.train(weights, wrong, epochs=1)
        assert (await executor.evaluate(trained))["accuracy"] > 0.8  # the child survived
        with trio.move_on_after(0.5):  # a cancelled job stops in the child too
            await executor.train(weights, task.node_data(0, 2), epochs=100_000)
        with trio.fail_after(20):
            _, report = await executor.train(weights, task.node_data(0, 2), epochs=1)
        assert report.samples == task.node_data(0, 2).num_samples
        assert executor.worker_pid is not None
        os.kill(executor.worker_pid, signal.SIGKILL)
        with trio.fail_after(10), pytest.raises(ExecutorError, match="worker process exited"):
            await executor.evaluate(trained)
