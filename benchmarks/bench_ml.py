"""Learning-core speed: executor overhead and aggregation cost, each next to its baseline.

1. Executor overhead: the digits MLP trained through ``Executor.train`` (trio, CapacityLimiter;
   mode "thread" and mode "process") vs. a bare torch loop over the same batches in the main
   thread, end to end (weights in, trained weights out), and ``fit`` called directly for the
   split between the training loop and the executor around it. Target: <= 5 % slower. All
   variants run interleaved, ``--repeats`` times; each repeat's executor time is divided by the
   bare loop's of the same repeat, and the median of those ratios is the overhead, by wall time
   and by CPU time (every thread of this process and of the worker process: on a machine shared
   with other jobs, wall time also counts waiting for a core, CPU time much less). Plus the
   fixed cost of a one-batch job.
2. Aggregation of 2 and of 8 state_dicts of 8.6M parameters: ``weighted_mean`` vs. raw torch
   adds of the same tensors (``a + b + ...`` per key, into a new state_dict). Target: <= 1.5x.
   Median and trimmed mean are printed for information (they sort, so they cost more).

Run: ``.venv/bin/python benchmarks/bench_ml.py [--repeats 15] [--only executor]`` (about a
minute on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import trio

from p2pfl.ml import load_task
from p2pfl.ml.adam import Adam
from p2pfl.ml.aggregation import coordinate_median, trimmed_mean, weighted_mean
from p2pfl.ml.executor import Executor

THREADS = 1
EPOCHS = 6.0


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (the scheduler's own account)."""
    total = 0
    for entry in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that ended
            total += int((entry / "schedstat").read_text().split()[0])
    return total


def _measured(
    prepare: Callable[[], Callable[[], int]], pids: tuple[int, ...]
) -> tuple[float, float, int]:
    """(wall s, CPU s of ``pids``, samples) of one call of what ``prepare`` returns (untimed)."""
    fn = prepare()
    cpu = sum(_cpu_ns(p) for p in pids)
    started = time.perf_counter()
    samples = fn()
    wall = time.perf_counter() - started
    return wall, (sum(_cpu_ns(p) for p in pids) - cpu) / 1e9, samples


def bare_loop(task, data, epochs: float) -> Callable[[], int]:  # type: ignore[no-untyped-def]
    """The plainest possible loop: same model, batches, optimizer, loss; built before the clock
    starts (the executor's jobs build or load theirs inside it). Returns samples."""
    model = task.make_model()
    # The optimizer fit() uses on CPU (step for step torch's Adam, without its dispatch layers):
    # the baseline is the same arithmetic, so the difference is the executor's alone.
    optimizer = Adam(model.parameters(), lr=task.config.lr)
    source = data.train_set
    steps = int(epochs * source.batches_per_epoch(task.config.batch_size) + 0.999)
    batches = source.batches(steps, task.config.batch_size, torch.Generator().manual_seed(0))

    def run() -> int:
        samples = 0
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += len(y)
        return samples

    return run


def fit_direct(task, data, weights, epochs: float) -> int:  # type: ignore[no-untyped-def]
    """``fit`` (through ``Task.train``) in this thread, weights in and out, no executor."""
    model = task.make_model()
    model.load_state_dict(weights)
    report = task.train(model, data, epochs=epochs)
    {k: v.detach().clone() for k, v in model.state_dict().items()}  # the copy a job hands back
    return int(report.samples)


def executor_job(executor: Executor, data, weights, epochs: float) -> int:  # type: ignore[no-untyped-def]
    async def main() -> int:
        _, report = await executor.train(weights, data, epochs=epochs)
        return int(report.samples)

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


def bench_executor(repeats: int) -> None:
    torch.set_num_threads(THREADS)
    task = load_task("digits", n_nodes=1)
    data = task.central_data()
    weights = task.make_model().state_dict()
    thread = Executor(task, threads=THREADS, mode="thread")
    process = Executor(task, threads=THREADS, mode="process")
    thread.warm_up(data)
    process.warm_up(data)
    me = os.getpid()
    child = process.worker_pid
    assert child is not None
    variants: dict[str, tuple[Callable[[], Callable[[], int]], tuple[int, ...]]] = {
        "bare torch loop": (lambda: bare_loop(task, data, EPOCHS), (me,)),
        "fit, no executor": (lambda: lambda: fit_direct(task, data, weights, EPOCHS), (me,)),
        "Executor thread": (lambda: lambda: executor_job(thread, data, weights, EPOCHS), (me,)),
        "Executor process": (
            lambda: lambda: executor_job(process, data, weights, EPOCHS),
            (me, child),
        ),
    }
    load_before = os.getloadavg()
    for fn, pids in variants.values():  # one untimed round: allocator and caches settle
        _measured(fn, pids)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so machine load hits all alike
        for name, (fn, pids) in variants.items():
            runs[name].append(_measured(fn, pids))
    latency = {
        label: _job_latency(ex, data) for label, ex in (("thread", thread), ("process", process))
    }
    process.close()
    load_after = os.getloadavg()
    print(
        f"executor overhead (digits MLP, {EPOCHS:g} epochs, {THREADS} torch thread, "
        f"{repeats} interleaved repeats; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after)"
    )
    print(
        "  variant             wall s: median   min   samples/s | overhead by wall: paired"
        " median [quartiles], of minima | CPU s: median   min | overhead by CPU: paired, minima"
    )
    bare = runs["bare torch loop"]
    for name, rs in runs.items():
        walls, cpus = [r[0] for r in rs], [r[1] for r in rs]
        line = (
            f"  {name:<18} {statistics.median(walls):13.3f} {min(walls):6.3f}"
            f" {statistics.median(r[2] / r[0] for r in rs):10,.0f}"
        )
        cpu = f" {statistics.median(cpus):14.3f} {min(cpus):6.3f}"
        if name == "bare torch loop":
            print(line + f" | {'(baseline)':<42} |" + cpu)
            continue
        by_wall = [100 * (r[0] / b[0] - 1) for r, b in zip(rs, bare, strict=True)]
        by_cpu = [100 * (r[1] / b[1] - 1) for r, b in zip(rs, bare, strict=True)]
        q = statistics.quantiles(by_wall, n=4)
        min_wall = 100 * (min(walls) / min(r[0] for r in bare) - 1)
        min_cpu = 100 * (min(cpus) / min(r[1] for r in bare) - 1)
        print(
            line
            + f" | {statistics.median(by_wall):+6.1f} % [{q[0]:+5.1f}, {q[2]:+5.1f}],"
            + f" {min_wall:+5.1f} %         |"
            + cpu
            + f" | {statistics.median(by_cpu):+5.1f} %, {min_cpu:+5.1f} %"
        )
    print("  target: overhead <= 5 %")
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", choices=("executor", "aggregation"))
    args = parser.parse_args()
    if args.only != "aggregation":
        bench_executor(args.repeats)
    if args.only != "executor":
        bench_aggregation()
