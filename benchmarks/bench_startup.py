"""Daemon start-up (issue 16, part 1): CPU-seconds and RSS until one daemon is ready.

Each run starts a real daemon, ``python -m p2pfl run --config FILE``, in a fresh temporary
directory: digits task (the MLP), open trust, mDNS off, signaling on 127.0.0.1, no peers, a gossip
period of an hour (so nothing trains while it idles). It needs no namespace and no root. The daemon
is *ready* when it tells its stand-in systemd ``READY=1`` on ``NOTIFY_SOCKET``: by then prepare()
has built the task, the model and the trainer and run the warm-up step, the control server and
the signaling listener are up. At that moment the benchmark reads ``/proc/PID``: CPU-seconds
(user + system, all threads), RSS and peak RSS; it checks that the control socket answers, lets
the daemon idle for ``--idle`` seconds, reads RSS and CPU again, and stops it with SIGTERM.

Two source trees, measured interleaved in the same run (``--runs`` times each, medians printed):

- *baseline*: ``--baseline`` (a git revision, by default the last commit before this work),
  exported with ``git archive``;
- *current*: the working tree (tracked and untracked, not ignored, files), copied.

Each tree runs twice per round: *source*, from a copy without ``__pycache__`` and with
``PYTHONDONTWRITEBYTECODE=1``, as an editable install does when bytecode is not written (every
daemon compiles p2pfl's modules again); and *compiled*, after ``python -m compileall`` on the copy,
as a wheel install has it (pip compiles at install). The interpreter and the installed packages
(torch, aiortc, ...) are the same for all: only p2pfl's own tree differs. Each round also runs
``python -c "import torch"`` (its CPU time when the import is done), the floor under any
daemon that builds a model. Then one run per variant with ``-X importtime`` prints the packages
that cost the most import time (the sum of their modules' own times; importtime's bookkeeping
inflates all figures: read them as shares). Last, without importtime's bookkeeping, the CPU time
each group of imports adds in the order a daemon first needs it (torch first), in fresh
processes of the current compiled tree (``--marginal-only``: just this, in about 20 s).

Target (issue 16): ready in <= 1.5 CPU-seconds and <= 300 MiB RSS, idle.

Run: ``.venv/bin/python benchmarks/bench_startup.py [--runs 5] [--baseline REV]`` (about 3 min).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from p2pfl.daemon.control import fetch_status

ROOT = Path(__file__).resolve().parents[1]
# The commit before aiortc was deferred to the first link and the collector paused during
# start-up; 3468bb5 is main before any of issue 16's start-up work.
BASELINE = "76758c0090fd6d39e70bb74b7cfb8e8ed09defe5"
TARGET_CPU_S = 1.5
TARGET_RSS_MIB = 300.0
_TICK = os.sysconf("SC_CLK_TCK")

CONFIG = """\
[node]
name = "startup"
state_dir = "{dir}/state"
runtime_dir = "{dir}/run"
[trust]
mode = "open"
[discovery]
mdns = false
listen_host = "127.0.0.1"
[protocol.params]
period = 3600.0
[task]
name = "digits"
n_nodes = 4
[logging]
level = "warning"
[checkpoints]
interval_s = 3600.0
"""


@dataclass(frozen=True)
class Variant:
    label: str
    tree: Path

    @property
    def slug(self) -> str:
        return re.sub(r"\W+", "-", self.label).strip("-")


# The split run: the same daemon, its CPU time read in-process when `import torch` is done. torch
# is imported first (a daemon imports it in prepare(), after the configuration), under the
# collector setting the tree's `p2pfl run` starts with, so the work is the same, in another order.
SPLIT_PRELUDE = """\
import gc, os, runpy, sys, time
if os.environ["P2PFL_BENCH_GC"] == "off":
    gc.disable()
import torch
with open(os.environ["P2PFL_BENCH_TORCH"], "w") as out:
    out.write(repr(time.process_time()))
sys.argv = ["p2pfl", *sys.argv[1:]]
runpy.run_module("p2pfl", run_name="__main__", alter_sys=True)
"""


def _run_pauses_gc(tree: Path) -> bool:
    """Whether the tree's `p2pfl run` turns the collector off at its start."""
    return "gc.disable()" in (tree / "p2pfl" / "cli" / "_run.py").read_text()


@dataclass(frozen=True)
class Sample:
    wall_s: float  # process start to READY=1
    cpu_s: float  # CPU-seconds at READY=1
    rss_mib: float  # RSS at READY=1
    idle_rss_mib: float  # RSS after --idle seconds
    peak_mib: float  # VmHWM after --idle seconds
    idle_cpu: float  # share of one core while idle
    torch_cpu_s: float = float("nan")  # split runs: CPU-seconds when `import torch` was done


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, every thread


def _status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _export_baseline(revision: str, into: Path) -> Path:
    tree = into / "baseline"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _copy_working_tree(into: Path) -> Path:
    tree = into / "current"
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        source = ROOT / os.fsdecode(raw)
        if source.is_file():  # deleted but not yet committed files are listed too
            target = tree / os.fsdecode(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return tree


def _compiled_copy(tree: Path) -> Path:
    compiled = tree.with_name(tree.name + "-compiled")
    shutil.copytree(tree, compiled)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(compiled / "p2pfl")],
        check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""},
    )
    return compiled


def _env(tree: Path, notify: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    return env


def _check_tree_is_used(tree: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import p2pfl; print(p2pfl.__file__)"],
        cwd=tree.parent,  # not the caller's directory: `python -c` puts it first on sys.path
        env=_env(tree),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).is_relative_to(tree):
        raise SystemExit(f"p2pfl resolves to {out}, not to the tree under test {tree}")


def measure(
    variant: Variant, idle_s: float, extra_args: tuple[str, ...] = (), *, split: bool = False
) -> Sample:
    with tempfile.TemporaryDirectory(prefix="p2pfl-su-", dir="/tmp") as tmp:
        run_dir = Path(tmp)
        config = run_dir / "p2pfl.toml"
        config.write_text(CONFIG.format(dir=run_dir))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(run_dir / "notify"))
        notify.settimeout(300)
        log = (run_dir / "daemon.log").open("wb")
        argv = [sys.executable, *extra_args, "-m", "p2pfl", "run", "--config", str(config)]
        env = _env(variant.tree, run_dir / "notify")
        torch_file = run_dir / "torch-cpu"
        if split:
            argv = [sys.executable, "-c", SPLIT_PRELUDE, "run", "--config", str(config)]
            env["P2PFL_BENCH_TORCH"] = str(torch_file)
            env["P2PFL_BENCH_GC"] = "off" if _run_pauses_gc(variant.tree) else "on"
        started = time.monotonic()
        daemon = subprocess.Popen(
            argv,
            cwd=run_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while True:
                try:
                    message = notify.recv(4096)
                except TimeoutError:
                    raise SystemExit(f"{variant.label}: no READY=1 within 300 s") from None
                if message.startswith(b"READY=1"):
                    break
            wall = time.monotonic() - started
            cpu = _cpu_seconds(daemon.pid)
            rss = _status_mib(daemon.pid, "VmRSS")
            status = fetch_status(run_dir / "run" / "control.sock")
            assert status.task == "digits", status
            time.sleep(idle_s)
            idle_cpu = (_cpu_seconds(daemon.pid) - cpu) / max(idle_s, 1e-9)
            idle_rss = _status_mib(daemon.pid, "VmRSS")
            peak = _status_mib(daemon.pid, "VmHWM")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            notify.close()
            log.close()
        if extra_args:  # keep the importtime report (written to stderr, i.e. the log)
            shutil.copy(run_dir / "daemon.log", variant.tree.parent / f"{variant.slug}.importtime")
        torch_cpu = float(torch_file.read_text()) if split else float("nan")
        return Sample(wall, cpu, rss, idle_rss, peak, idle_cpu, torch_cpu)


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_report(path: Path, top: int) -> list[tuple[str, float]]:
    """(package, ms) by summed self time; p2pfl is split into its subpackages."""
    by_package: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        match = _IMPORT_LINE.match(line)
        if match is None:
            continue
        name = match[4]
        parts = name.split(".")
        package = ".".join(parts[:2]) if parts[0] == "p2pfl" else parts[0]
        if name.startswith("torch._dynamo"):
            package = "torch._dynamo"
        by_package[package] += int(match[1])
    return [(package, us / 1000) for package, us in by_package.most_common(top)]


def bare_torch() -> tuple[float, float]:
    """(CPU-seconds, peak RSS MiB) of ``python -c "import torch"`` when the import is done (not at
    exit: torch's teardown costs CPU a daemon has not spent at READY): the floor under a daemon."""
    code = "import resource, time, torch; print(time.process_time(), resource.getrusage(0)[2])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), int(out[1]) / 1024


# What a digits daemon imports before READY, in the order it first needs it, after torch: each
# step's CPU time in one fresh process is what that step adds to what is already loaded.
MARGINAL_STEPS = (
    ("torch", "import torch"),
    ("numpy.random (the partition)", "import numpy.random"),
    ("trio", "import trio"),
    ("cryptography (Ed25519)", "from cryptography.hazmat.primitives.asymmetric import ed25519"),
    ("pydantic", "import pydantic"),
    ("p2pfl.learning.setup: its models, protocols", "import p2pfl.learning.setup"),
    ("click, p2pfl.cli", "import p2pfl.cli, p2pfl.cli._run"),
    ("prometheus_client", "import prometheus_client"),
    (
        "p2pfl daemon node, trainer, ml",
        "import p2pfl.daemon.node, p2pfl.daemon.trainer, p2pfl.learning.ops, p2pfl.ml.executor",
    ),
    (
        "p2pfl transport, signaling, wire",
        "import p2pfl.daemon.transport, p2pfl.daemon.signaling, p2pfl.wire, p2pfl.learning.codecs",
    ),
    # Not before READY: aiortc (with PyAV) comes with the first link, zeroconf with mDNS.
    ("(av: at the first link, by aiortc)", "import av"),
    ("(aiortc, aioice, dnspython: first link)", "import aiortc"),
    ("(zeroconf: only with mdns on)", "import zeroconf, zeroconf.asyncio"),
)
_AFTER_READY = 3  # the last steps of MARGINAL_STEPS, not part of a daemon's start-up


def marginal_imports(tree: Path, runs: int) -> None:
    """Print each step of MARGINAL_STEPS: min and median CPU ms over ``runs`` fresh processes."""
    code = "import time\nout = []\nt = time.process_time()\n" + "".join(
        f"{statement}\nn = time.process_time(); out.append(n - t); t = n\n"
        for _, statement in MARGINAL_STEPS
    )
    code += "print(*out)"
    samples = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tree.parent,
            env=_env(tree),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        samples.append([float(x) for x in out.split()])
    print(f"\n== CPU ms each import adds, in order, {runs} fresh processes ({tree.name}), "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for i, (label, _) in enumerate(MARGINAL_STEPS):
        values = [s[i] * 1000 for s in samples]
        print(f"  {label:<46}{min(values):>7.0f} min{statistics.median(values):>7.0f} median")
    beyond = [sum(s[1:-_AFTER_READY]) * 1000 for s in samples]
    print(f"  {'all of it after torch, to READY (mdns off)':<46}{min(beyond):>7.0f} min"
          f"{statistics.median(beyond):>7.0f} median")  # fmt: skip


def _row(label: str, samples: list[Sample], splits: list[Sample]) -> str:
    def med(field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in samples))

    torch = statistics.median(s.torch_cpu_s for s in splits)
    rest = [s.cpu_s - s.torch_cpu_s for s in splits]
    return (
        f"{label:<22}{med('cpu_s'):>8.2f}{torch:>8.2f}{statistics.median(rest):>8.2f}"
        f"{med('wall_s'):>8.2f}{med('rss_mib'):>9.0f}{med('idle_rss_mib'):>10.0f}"
        f"{med('peak_mib'):>7.0f}{med('idle_cpu'):>7.1%}"
        f"   CPU {min(s.cpu_s for s in samples):.2f}-{max(s.cpu_s for s in samples):.2f}"
        f", rest {min(rest):.2f}-{max(rest):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="daemon starts per variant")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle after READY")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline")
    parser.add_argument("--top", type=int, default=12, help="packages in the importtime list")
    parser.add_argument(
        "--compiled-only", action="store_true", help="skip the from-source variants"
    )
    parser.add_argument(
        "--no-importtime", action="store_true", help="skip the importtime and per-import parts"
    )
    parser.add_argument(
        "--marginal-only", action="store_true", help="only the per-import CPU of the current tree"
    )
    args = parser.parse_args()
    if args.marginal_only:
        with tempfile.TemporaryDirectory(prefix="p2pfl-bench-startup-", dir="/tmp") as tmp:
            marginal_imports(_compiled_copy(_copy_working_tree(Path(tmp))), max(args.runs, 3))
        return

    with tempfile.TemporaryDirectory(prefix="p2pfl-bench-startup-", dir="/tmp") as tmp:
        trees = {
            "baseline": _export_baseline(args.baseline, Path(tmp)),
            "current": _copy_working_tree(Path(tmp)),
        }
        variants: list[Variant] = []
        for name, tree in trees.items():
            _check_tree_is_used(tree)
            if not args.compiled_only:
                variants.append(Variant(f"{name} (source)", tree))
            variants.append(Variant(f"{name} (compiled)", _compiled_copy(tree)))
        load = os.getloadavg()
        print(f"== daemon start-up until READY=1: digits, open trust, no peers; {args.runs} runs "
              f"each, interleaved; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        print(f"baseline = {args.baseline[:12]}, current = working tree of {ROOT}")
        samples: dict[str, list[Sample]] = {v.label: [] for v in variants}
        splits: dict[str, list[Sample]] = {v.label: [] for v in variants}
        torch_only: list[tuple[float, float]] = []
        for run in range(args.runs):
            for variant in variants:
                samples[variant.label].append(measure(variant, args.idle))
                splits[variant.label].append(measure(variant, 0.0, split=True))
            torch_only.append(bare_torch())
            print(f"  round {run + 1}/{args.runs} done", file=sys.stderr)
        torch_cpu = statistics.median(t[0] for t in torch_only)
        torch_rss = statistics.median(t[1] for t in torch_only)
        print(f"{'(medians)':<22}{'CPU s':>8}{'torch':>8}{'rest':>8}{'wall s':>8}{'RSS MiB':>9}"
              f"{'idle RSS':>10}{'peak':>7}{'idle':>7}")  # fmt: skip
        for variant in variants:
            print(_row(variant.label, samples[variant.label], splits[variant.label]))
        low, high = min(t[0] for t in torch_only), max(t[0] for t in torch_only)
        print(f"{'python -c import torch':<22}{torch_cpu:>8.2f}{torch_cpu:>8.2f}{0:>8.2f}"
              f"{'':>8}{'':>9}{'':>10}{torch_rss:>7.0f}   CPU {low:.2f}-{high:.2f}")  # fmt: skip
        print(
            "(CPU s: CPU-seconds at READY=1 of `python -m p2pfl run`; torch, rest: the same daemon "
            "in a second, split run that imports torch first and reads its CPU time in-process "
            "when the import is done (under the collector setting the tree's `p2pfl run` starts "
            "with), rest = its CPU at READY minus that; RSS at READY, after idling, peak; idle: "
            "CPU share idling; the last row: a bare `import torch` with Python's defaults)"
        )
        current = samples["current (compiled)"]
        best = statistics.median(s.cpu_s for s in current)
        rss = statistics.median(s.idle_rss_mib for s in current)
        verdict = "met" if best <= TARGET_CPU_S and rss <= TARGET_RSS_MIB else "NOT met"
        print(f"target: ready in <= {TARGET_CPU_S} CPU-s and <= {TARGET_RSS_MIB:.0f} MiB idle "
              f"RSS (current, compiled: {best:.2f} CPU-s, {rss:.0f} MiB): {verdict}")  # fmt: skip
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        if args.no_importtime:
            return
        print("\n== -X importtime, one run per variant: packages by summed self time, ms")
        reports = {}
        for variant in variants:
            measure(variant, 0.5, ("-X", "importtime"))
            reports[variant.label] = import_report(
                variant.tree.parent / f"{variant.slug}.importtime", args.top
            )
        labels = list(reports)
        print("".join(f"{label:<34}" for label in labels))
        for i in range(args.top):
            cells = []
            for label in labels:
                rows = reports[label]
                cells.append(f"{rows[i][0]:<22}{rows[i][1]:>7.0f}" if i < len(rows) else "")
            print("".join(f"{c:<34}" for c in cells))
        compiled = next(v for v in variants if v.label == "current (compiled)")
        marginal_imports(compiled.tree, max(args.runs, 3))


if __name__ == "__main__":
    main()
