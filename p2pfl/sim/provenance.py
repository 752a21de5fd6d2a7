"""Where a results folder came from: the commit, the exact command, the package versions and
the machine's floating-point path.

Results are reproducible or they are not results: every ``p2pfl simulate`` writes
``provenance.json`` next to ``results.json``, so a committed folder says which code produced it
and how to produce it again (``tests/sim/test_committed_results.py`` re-runs the small digits
experiment and compares).

The same code and seed give the same bits only on the same floating-point path: torch picks its
CPU kernels by instruction set (AVX2, AVX-512, ...), and their sums round differently, which
many training steps amplify (the digits experiment's final accuracies moved by up to 1.9 points
between kernel paths of one machine; rounds, bytes and times did not move). ``float_fingerprint``
digests a few training steps and a numpy softmax, so two records with the same fingerprint
should agree to the bit, and two with different ones only as far as training noise allows. It is
taken after the run, and only in a process that has loaded torch (see ``write_provenance``).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["PACKAGES", "float_fingerprint", "provenance", "write_provenance"]

MAX_PATHS = 50

PACKAGES = ("p2pfl-edge", "torch", "numpy", "trio", "aiortc", "zeroconf", "msgpack", "cryptography")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def float_fingerprint() -> str:
    """16 hex digits of a digest of 8 fixed Adam steps of a small MLP (torch, one thread) and a
    numpy log-softmax: equal where training rounds the same way. Uses its own generators and
    restores torch's thread count, so the run that follows sees no difference."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from p2pfl.ml.adam import Adam

    digest = hashlib.sha256()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engines train; a reduction's order follows its threads
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(256, 64, generator=gen)
        y = torch.randint(0, 10, (256,), generator=gen)
        params = [
            torch.randn(128, 64, generator=gen) * 0.1,
            torch.zeros(128),
            torch.randn(10, 128, generator=gen) * 0.1,
            torch.zeros(10),
        ]
        for param in params:
            param.requires_grad_()
        optimizer = Adam(params, lr=3e-3)
        for batch in range(8):
            rows = slice(batch * 32, (batch + 1) * 32)
            hidden = F.relu(F.linear(x[rows], params[0], params[1]))
            loss = F.cross_entropy(F.linear(hidden, params[2], params[3]), y[rows])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        for param in params:
            digest.update(param.detach().numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((256, 65)) @ rng.standard_normal((65, 10))
    logits -= logits.max(axis=1, keepdims=True)
    digest.update((logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).tobytes())
    return digest.hexdigest()[:16]


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def provenance(argv: list[str], *, source: Path | None = None) -> dict[str, object]:
    """The record for a run started as ``argv`` from the checkout holding ``source``."""
    where = source if source is not None else Path(__file__).resolve().parents[2]
    commit = _git("rev-parse", "HEAD", cwd=where)
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=where)
    changed = _git("diff", "--name-only", "HEAD", cwd=where) if dirty else None
    paths = sorted(changed.splitlines()) if changed else []
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": shlex.join(["p2pfl", *argv]),
        "commit": commit,
        "uncommitted_changes": bool(dirty) if dirty is not None else None,
        # which tracked files differed from the commit (a results folder written by an earlier
        # run is harmless; a changed source file means the commit is not the whole story)
        "uncommitted_paths": paths[:MAX_PATHS]
        + ([f"... {len(paths) - MAX_PATHS} more"] if len(paths) > MAX_PATHS else []),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "packages": versions,
    }


def write_provenance(
    out_dir: Path, argv: list[str] | None = None, *, record: dict[str, object] | None = None
) -> Path:
    """Write ``provenance.json``: ``record`` (taken before the run wrote anything, so its own
    output does not count as an uncommitted change), else one for ``argv`` (``sys.argv``).

    Adds ``float_fingerprint`` where this process has loaded torch by now: the virtual engine
    trained here, and the processes engine's harness loaded the task (in a thread, while its
    daemons started). A process that never loaded torch records null rather than importing it
    for this (a second and 280 MiB). Taken after the run, it cannot delay or change it."""
    if record is None:
        record = provenance(sys.argv[1:] if argv is None else argv)
    if "float_fingerprint" not in record:
        torch_loaded = "torch" in sys.modules
        record = {**record, "float_fingerprint": float_fingerprint() if torch_loaded else None}
    path = out_dir / "provenance.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path
