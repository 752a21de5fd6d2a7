"""p2pfl against Flower and a plain FedAvg loop on one task, interleaved in one sitting (issue 16).

The task and the other systems are those of ``../shared/peers/`` (see its README: scikit-learn
digits, 10 clients by Dirichlet(0.5), MLP 64-64-10, 1 local epoch, 20 FedAvg rounds). This script
runs, REPS times in turn, every system through that folder's ``monitor.py`` (the whole process
tree in a fresh PID namespace: wall, CPU-seconds of every descendant, peak summed RSS and PSS):

- ``plain``: ``fedavg_plain.py``, the 40-line in-process FedAvg loop (the baseline);
- ``plain-1thread``: the same loop with one torch thread (``OMP_NUM_THREADS=1``), as p2pfl trains
  (on a loaded machine torch's default threads spin and the plain loop slows down several-fold);
- ``flwr``: Flower's ``flwr run`` with its Ray simulation, 10 SuperNodes (as ``run.sh`` runs it);
- ``p2pfl-virtual``: ``p2pfl simulate peers_digits_fedavg.toml --engine virtual``;
- ``p2pfl-processes``: the same scenario with ``--engine processes``: 10 real daemons in their
  own network namespaces, real mDNS, WebRTC and signatures, forked from one warm process;
- ``p2pfl-processes-cold`` (``--baseline REV``, default: the commit before the fork server):
  the same command from that revision's tree, where every daemon is a cold ``python -m p2pfl run``.

The p2pfl commands are timed whole, as a person runs them: start-up, the run, writing results and
plots. What differs from the peers task (the scenario is as near as p2pfl's settings go): p2pfl's
digits split and Dirichlet partition are its own draws (same data, same alpha, other samples per
node), its MLP is 64-128-64-10 (17,226 parameters, not 64-64-10) trained with Adam at its lr, not
SGD with momentum, and the processes engine stops when every daemon reports round 20, polled
every second.

Run (root, for the namespaces; about 6 min per rep on 2 loaded cores)::

    export PEERS=/tmp/peers; bash ../shared/peers/setup.sh $PEERS   # Flower + base venvs, once
    .venv/bin/python benchmarks/bench_peers.py --peers $PEERS --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = Path(__file__).with_name("peers_digits_fedavg.toml")
BASELINE = "d484d3c"  # the last commit that started every daemon cold
SYSTEMS = (
    "plain",
    "plain-1thread",
    "flwr",
    "p2pfl-virtual",
    "p2pfl-processes",
    "p2pfl-processes-cold",
)


def _peers_env(peers: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PEERS=str(peers),
        HOME=str(peers / "home"),
        TMPDIR=str(peers / "tmp"),
        RAY_TMPDIR=str(peers / "tmp/ray"),
        FLWR_HOME=str(peers / "flwr_home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    for key in ("HOME", "TMPDIR", "RAY_TMPDIR", "FLWR_HOME"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def _command(system: str, peers: Path, shared: Path, out: Path, baseline: Path | None) -> list[str]:
    npz = peers / "data/digits_split.npz"
    if system in ("plain", "plain-1thread"):
        return [str(peers / "base-venv/bin/python"), str(shared / "fedavg_plain.py"), str(out)]
    if system == "flwr":
        return [
            str(peers / "flwr-venv/bin/flwr"), "run", str(shared / "flwr_app"), "--stream",
            "--federation-config", "num-supernodes=10 client-resources-num-cpus=1",
            "--run-config", f"out-file='{out}' data-npz='{npz}'",
        ]  # fmt: skip
    engine = "virtual" if system == "p2pfl-virtual" else "processes"
    tree = baseline if system == "p2pfl-processes-cold" else ROOT
    return [
        "env", f"PYTHONPATH={tree}", sys.executable, "-m", "p2pfl", "simulate", str(SCENARIO),
        "--engine", engine, "--out", str(out),
    ]  # fmt: skip


def _accuracy(system: str, out: Path) -> tuple[float | None, int | None]:
    """Final accuracy and rounds reached."""
    try:
        if system in ("plain", "plain-1thread", "flwr"):
            accs = json.loads(out.read_text())["acc_per_round"]
            return float(accs[-1]), len(accs)
        result = json.loads((out / "results.json").read_text())
        setup = result["setups"][0]
        rounds = max((n["rounds"] for n in setup["nodes"]), default=None)
        return float(setup["final"]["accuracy"]), rounds
    except (OSError, KeyError, ValueError, IndexError):
        return None, None


def run_once(
    system: str, rep: int, peers: Path, shared: Path, results: Path, baseline: Path | None
) -> dict:
    out = results / f"{system}_out_{rep}"
    if system in ("plain", "plain-1thread", "flwr"):
        out = results / f"{system}_acc_{rep}.json"
    if system == "flwr":
        for sub in ("local-superlink", "apps", "source"):
            shutil.rmtree(peers / "flwr_home" / sub, ignore_errors=True)
    env = _peers_env(peers) if system in ("plain", "plain-1thread", "flwr") else dict(os.environ)
    if system == "plain-1thread":
        env["OMP_NUM_THREADS"] = "1"
    if system == "flwr":  # `flwr run` starts `flower-superlink` from PATH, as run.sh has it
        env["PATH"] = f"{peers / 'flwr-venv/bin'}:{env['PATH']}"
    env.setdefault("MONITOR_TIMEOUT", "900")
    mon = results / f"{system}_mon_{rep}.json"
    argv = [
        "unshare", "--pid", "--fork", "--mount-proc", str(peers / "base-venv/bin/python"),
        str(shared / "monitor.py"), str(mon), "--", *_command(system, peers, shared, out, baseline),
    ]  # fmt: skip
    cwd = shared / "flwr_app" if system == "flwr" else ROOT
    if system == "p2pfl-processes-cold":
        assert baseline is not None
        cwd = baseline  # `python -m` puts the working directory first on sys.path
    with (results / f"{system}_{rep}.log").open("wb") as log:
        subprocess.run(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    try:
        measured = json.loads(mon.read_text())
    except (OSError, ValueError):
        measured = {"rc": -1}
    measured["accuracy"], measured["rounds"] = _accuracy(system, out)
    print(
        f"{system:22s} rep {rep}: rc {measured.get('rc')} wall {measured.get('wall_s')} s, "
        f"CPU {measured.get('cpu_s')} s, RSS sum {measured.get('peak_rss_sum_mb')} MiB, "
        f"PSS sum {measured.get('peak_pss_sum_mb')} MiB, acc {measured['accuracy']} "
        f"({measured['rounds']} rounds)",
        flush=True,
    )
    return measured


def table(samples: dict[str, list[dict]]) -> str:
    rows = [
        "| system | ok | wall s, median [min-max] | vs plain loop | CPU s | peak RSS sum MiB "
        "| peak PSS sum MiB | final accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = {
        s: [m for m in ms if m.get("rc") == 0 and m.get("rounds") == 20]
        for s, ms in samples.items()
    }
    plain = statistics.median(m["wall_s"] for m in ok["plain"]) if ok.get("plain") else None
    for system, ms in samples.items():
        good = ok[system]
        if not good:
            rows.append(f"| {system} | 0/{len(ms)} | failed | | | | | |")
            continue

        def med(key: str, good: list[dict] = good) -> float:
            return statistics.median(m[key] for m in good)

        walls = [m["wall_s"] for m in good]
        ratio = f"{med('wall_s') / plain:.1f}" if plain else "-"
        rows.append(
            f"| {system} | {len(good)}/{len(ms)} | {med('wall_s'):.1f} [{min(walls):.1f}-"
            f"{max(walls):.1f}] | {ratio} | {med('cpu_s'):.1f} | {med('peak_rss_sum_mb'):.0f} | "
            f"{med('peak_pss_sum_mb'):.0f} | {med('accuracy'):.3f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=Path, default=Path(os.environ.get("PEERS", "/tmp/peers")))
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "peers")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--baseline", default=BASELINE, help="git revision for the cold daemons")
    args = parser.parse_args()
    peers, shared = args.peers.resolve(), args.shared.resolve()
    if not (peers / "flwr-venv/bin/flwr").exists():
        raise SystemExit(f"no Flower venv in {peers}: run `bash {shared}/setup.sh {peers}` first")
    systems = [s for s in args.systems.split(",") if s]
    results = peers / "results-p2pfl"
    results.mkdir(parents=True, exist_ok=True)
    (peers / "data").mkdir(exist_ok=True)
    with (peers / "data/partition_summary.json").open("wb") as summary:
        subprocess.run(
            [str(peers / "base-venv/bin/python"), str(shared / "prepare_data.py"),
             str(peers / "data/digits_split.npz")],
            env=_peers_env(peers), stdout=summary, check=True,
        )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="p2pfl-peers-") as tmp:
        baseline = None
        if "p2pfl-processes-cold" in systems:
            baseline = Path(tmp) / "baseline"
            baseline.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline, "p2pfl"],
                capture_output=True, check=True,
            ).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
            used = subprocess.run(
                [sys.executable, "-c", "import p2pfl.sim.processes as p; print(p.__file__)"],
                cwd=baseline, env={**os.environ, "PYTHONPATH": str(baseline)},
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            if not used.startswith(str(baseline)):
                raise SystemExit(f"the baseline tree is not the one imported: {used}")
        samples: dict[str, list[dict]] = {s: [] for s in systems}
        for rep in range(1, args.reps + 1):
            for system in systems:
                samples[system].append(run_once(system, rep, peers, shared, results, baseline))
    print()
    print(table(samples))


if __name__ == "__main__":
    main()
