"""Committed experiments are what the code produces today (wall times aside).

``FOLDERS``: the digits experiment, and the committed runs short enough to re-run in CI (10-20
s each here): one codec, the churn-and-loss run, the 1,000-node gossip run (numpy path).

When a change moves these numbers, re-run the experiment with the command in its
provenance.json, commit the new folder, and say in its README what moved and why.

Bit for bit where this machine rounds as the committing one did (the same
``float_fingerprint`` in both records; a run without torch, or one committed before the
fingerprint was recorded, has none to compare, so it takes the other branch); elsewhere
everything but the trained models' scores must still match exactly (rounds, bytes, virtual
times, messages, the folder's shape) and each setup's final accuracy within
``ACCURACY_SPREAD``, above the spread measured between float paths: torch's AVX-512, AVX2 and
default kernels of one machine, with and without MKL's reproducibility settings, and another
machine, gave final accuracies up to 1.9 points apart (centralized 0.956-0.975; gossip 1.2,
FedAvg 0.3, server-free 0).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "simulations" / "results"
FOLDERS = ("digits-10-noniid", "codecs/int8", "robustness/faulty", "scale-1000-gossip")
SCORES = ("accuracy", "loss")
ACCURACY_SPREAD = 0.03


def _without(value: Any, keys: tuple[str, ...]) -> Any:
    """``value`` without wall times and without the keys in ``keys``, at any depth."""
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if "wall" not in k and k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


@pytest.mark.slow
@pytest.mark.parametrize("name", FOLDERS)
def test_rerunning_a_committed_experiment_gives_its_committed_results(
    tmp_path: Path, name: str
) -> None:
    folder = RESULTS / name
    provenance = json.loads((folder / "provenance.json").read_text())
    argv = shlex.split(provenance["command"])
    assert argv[:2] == ["p2pfl", "simulate"] and "--out" in argv
    argv[argv.index("--out") + 1] = str(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "p2pfl", *argv[1:]], cwd=ROOT, check=True, capture_output=True
    )
    committed = json.loads((folder / "results.json").read_text())
    rerun = json.loads((tmp_path / "results.json").read_text())
    here = json.loads((tmp_path / "provenance.json").read_text())["float_fingerprint"]
    recorded = provenance.get("float_fingerprint")
    if recorded is not None and here == recorded:
        assert _without(rerun, ()) == _without(committed, ())
        return
    assert _without(rerun, SCORES) == _without(committed, SCORES)
    for mine, theirs in zip(rerun["setups"], committed["setups"], strict=True):
        assert mine["final"]["accuracy"] == pytest.approx(
            theirs["final"]["accuracy"], abs=ACCURACY_SPREAD
        ), mine["name"]


def test_the_float_fingerprint_is_stable_and_leaves_the_run_alone() -> None:
    import torch

    from p2pfl.sim.provenance import float_fingerprint

    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    first = float_fingerprint()
    assert float_fingerprint() == first and len(first) == 16
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)


def test_the_float_fingerprint_tells_kernel_paths_apart() -> None:
    """torch's default (scalar) kernels round differently from this machine's vector ones."""
    import torch

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no vector kernels for torch to choose instead of the default")
    code = "from p2pfl.sim.provenance import float_fingerprint; print(float_fingerprint())"
    fingerprints = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for env in ({}, {"ATEN_CPU_CAPABILITY": "default"})
    }
    assert len(fingerprints) == 2


def test_a_process_without_torch_records_no_fingerprint_and_loads_none(tmp_path: Path) -> None:
    """Writing provenance never imports torch only to take the fingerprint."""
    code = (
        "import sys, json, pathlib\n"
        "from p2pfl.sim.provenance import write_provenance\n"
        f"path = write_provenance(pathlib.Path({str(tmp_path)!r}), ['simulate', 'x.toml'])\n"
        "record = json.loads(path.read_text())\n"
        "print(record['float_fingerprint'], 'torch' in sys.modules, 'cpu' in record)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    )
    assert out.stdout.split() == ["None", "False", "True"]
