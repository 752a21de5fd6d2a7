"""Learning-core speed: executor overhead and aggregation cost, each next to its baseline.

1. Executor overhead: the digits MLP trained through ``Executor.train`` (trio, CapacityLimiter;
   mode "thread" and mode "process") vs. a bare torch loop over the same batches in the main
   thread, end to end. Target: <= 5 % slower. Plus the fixed cost of a one-batch job. On a
   machine shared with other jobs, repeat: single medians here ranged from -5 % to +11 %.
2. Aggregation of 2 and of 8 state_dicts of 8.6M parameters: ``weighted_mean`` vs. raw torch
   adds of the same tensors (``a + b + ...`` per key, into a new state_dict). Target: <= 1.5x.
   Median and trimmed mean are printed for information (they sort, so they cost more).

Run: ``.venv/bin/python benchmarks/bench_ml.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import trio

from p2pfl.ml import load_task
from p2pfl.ml.adam import Adam
from p2pfl.ml.aggregation import coordinate_median, trimmed_mean, weighted_mean
from p2pfl.ml.executor import Executor

THREADS = 1
EPOCHS = 6.0
REPEATS = 7


def bare_loop(task, data, epochs: float) -> float:  # type: ignore[no-untyped-def]
    """samples/s of the plainest possible loop: same model, batches, optimizer, loss."""
    model = task.make_model()
    # The optimizer fit() uses on CPU (step for step torch's Adam, without its dispatch layers):
    # the baseline is the same arithmetic, so the difference is the executor's alone.
    optimizer = Adam(model.parameters(), lr=task.config.lr)
    source = data.train_set
    steps = int(epochs * source.batches_per_epoch(task.config.batch_size) + 0.999)
    batches = source.batches(steps, task.config.batch_size, torch.Generator().manual_seed(0))
    started = time.perf_counter()
    samples = 0
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += len(y)
    return samples / (time.perf_counter() - started)


def executor_loop(executor: Executor, data, epochs: float) -> float:  # type: ignore[no-untyped-def]
    weights = executor.task.make_model().state_dict()

    async def main() -> float:
        started = time.perf_counter()
        _, report = await executor.train(weights, data, epochs=epochs)
        return report.samples / (time.perf_counter() - started)  # end to end, not report's own

    return trio.run(main)


def _job_latency(executor: Executor, data) -> float:  # type: ignore[no-untyped-def]
    weights = executor.task.make_model().state_dict()

    async def main() -> float:
        runs = []
        for _ in range(20):
            started = time.perf_counter()
            await executor.train(weights, data, epochs=1e-9)
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    return trio.run(main)


def bench_executor() -> None:
    torch.set_num_threads(THREADS)
    task = load_task("digits", n_nodes=1)
    data = task.central_data()
    thread = Executor(task, threads=THREADS, mode="thread")
    process = Executor(task, threads=THREADS, mode="process")
    thread.warm_up(data)
    process.warm_up(data)
    bare, in_thread, in_process = [], [], []
    for _ in range(REPEATS):  # interleaved, so machine load hits all alike
        bare.append(bare_loop(task, data, EPOCHS))
        in_thread.append(executor_loop(thread, data, EPOCHS))
        in_process.append(executor_loop(process, data, EPOCHS))
    latency = {
        label: _job_latency(ex, data) for label, ex in (("thread", thread), ("process", process))
    }
    process.close()
    b = statistics.median(bare)
    print(f"executor overhead (digits MLP, {EPOCHS:g} epochs, {THREADS} torch thread, median)")
    print(f"  bare torch loop          : {b:10,.0f} samples/s")
    for label, runs in (("thread", in_thread), ("process", in_process)):
        e = statistics.median(runs)
        overhead = 100 * (b / e - 1)
        print(
            f"  Executor.train ({label:<7}): {e:10,.0f} samples/s   overhead {overhead:+.1f} %"
            "   target <= 5 %"
        )
    print(
        "  fixed cost of one job (one batch, median of 20): "
        + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in latency.items())
    )


def _state(params: int, seed: int) -> dict[str, torch.Tensor]:
    """``params`` parameters in layers shaped like a small CNN / transformer mix."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2048, 2048), (2048, 1024), (1024, 1024), (512, 512, 3, 3)]
    state, total, i = {}, 0, 0
    while total < params:
        shape = shapes[i % len(shapes)]
        n = int(torch.Size(shape).numel()) + shape[0]
        if total + n > params:
            shape, n = (params - total,), params - total
        state[f"layer{i}.weight"] = torch.randn(shape, generator=g)
        if len(shape) > 1:
            state[f"layer{i}.bias"] = torch.randn(shape[0], generator=g)
        total += n
        i += 1
    return state


def _time(fn, repeats: int = 10) -> float:  # type: ignore[no-untyped-def]
    fn()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return min(runs)


def _raw_adds(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # Like an aggregation, it returns a new state_dict: discarding each sum instead would let
    # the allocator hand the same pages back every time and time only the arithmetic.
    out = {}
    for key in states[0]:
        acc = states[0][key] + states[1][key]
        for s in states[2:]:
            acc += s[key]
        out[key] = acc
    return out


def bench_aggregation() -> None:
    torch.set_num_threads(THREADS)
    params = 8_600_000
    for n in (2, 8):
        states = [_state(params, seed) for seed in range(n)]
        count = sum(v.numel() for v in states[0].values())
        weights = [float(i + 1) for i in range(n)]
        t_raw = _time(functools.partial(_raw_adds, states))
        t_mean = _time(functools.partial(weighted_mean, states, weights))
        print(f"aggregation of {n} state_dicts, {count / 1e6:.2f}M parameters each")
        print(f"  raw torch adds   : {t_raw * 1000:8.1f} ms")
        ratio = t_mean / t_raw
        print(f"  weighted_mean    : {t_mean * 1000:8.1f} ms   {ratio:.2f}x   target <= 1.5x")
        if n == 8:
            t_median = _time(functools.partial(coordinate_median, states), 2)
            t_trim = _time(functools.partial(trimmed_mean, states, 0.2), 2)
            print(f"  coordinate_median: {t_median * 1000:8.1f} ms   (sorts; information)")
            print(f"  trimmed_mean 0.2 : {t_trim * 1000:8.1f} ms   (sorts; information)")


if __name__ == "__main__":
    bench_executor()
    bench_aggregation()
