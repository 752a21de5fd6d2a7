"""``p2pfl.ml`` exports every name lazily, and a digits node imports only what it uses."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import p2pfl.ml

# Never imported by a digits node, from the task to its first training step and the daemon's
# run-time modules.
NOT_FOR_DIGITS = (
    "sklearn",
    "scipy",
    "torch._dynamo",
    "sympy",
    "matplotlib",
    "rich",
    "p2pfl.ml.forecast",
    "p2pfl.ml.traffic",
    "p2pfl.ml.readings",
    "p2pfl.ml.synthetic",
)
# Never imported by a node with mDNS off (it finds peers through static entries only).
NOT_WITHOUT_MDNS = ("zeroconf",)
# Not imported before the first link is made (p2pfl.daemon.datachannel imports aiortc then):
# listening for signaling needs none of it.
NOT_BEFORE_A_LINK = ("aiortc", "aioice", "av", "OpenSSL", "p2pfl.daemon.sctp", "p2pfl.daemon.dtls")


def test_type_checking_block_lists_the_same_names_as_the_lazy_table() -> None:
    tree = ast.parse(Path(p2pfl.ml.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If))
    typed = {
        alias.asname: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == {name: f"p2pfl.ml.{module}" for name, module in p2pfl.ml._MODULE_OF.items()}


def test_every_exported_name_is_the_object_of_its_module() -> None:
    for name, module in p2pfl.ml._MODULE_OF.items():
        expected = getattr(importlib.import_module(f"p2pfl.ml.{module}"), name)
        assert getattr(p2pfl.ml, name) is expected, name
    assert set(p2pfl.ml.__all__) <= set(dir(p2pfl.ml))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        p2pfl.ml.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_a_digits_daemon_prepares_and_loads_its_runtime_without_unused_modules(
    tmp_path: Path,
) -> None:
    # prepare() builds the task, the model and the trainer and runs its warm-up step; then the
    # modules Node.run imports. Nothing on the lists may have been imported by then (mdns off).
    (tmp_path / "p2pfl.toml").write_text(
        textwrap.dedent(
            f"""
            [node]
            state_dir = "{tmp_path}/state"
            runtime_dir = "{tmp_path}/run"
            [trust]
            mode = "open"
            [discovery]
            mdns = false
            listen_host = "127.0.0.1"
            [task]
            name = "digits"
            n_nodes = 3
            partition = "dirichlet"
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from p2pfl.daemon.config import load_config
        from p2pfl.daemon.node import close_prepared, prepare
        import p2pfl.daemon.transport, p2pfl.daemon.signaling, p2pfl.daemon.limits, p2pfl.wire
        prepared = prepare(load_config(Path({str(tmp_path / "p2pfl.toml")!r})))
        close_prepared(prepared)
        unwanted = {NOT_FOR_DIGITS + NOT_WITHOUT_MDNS + NOT_BEFORE_A_LINK!r}
        print(",".join(m for m in unwanted if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_a_ready_daemon_has_no_aiortc_and_a_frozen_start_up(tmp_path: Path) -> None:
    # A real `p2pfl run` to READY (signaling listening, model built): by then it has imported
    # none of NOT_BEFORE_A_LINK, the collector was off while prepare() built the node, and what
    # start-up built is frozen (out of the collector's passes) with the collector on again.
    (tmp_path / "p2pfl.toml").write_text(
        textwrap.dedent(
            f"""
            [node]
            state_dir = "{tmp_path}/state"
            runtime_dir = "{tmp_path}/run"
            [trust]
            mode = "open"
            [discovery]
            mdns = false
            listen_host = "127.0.0.1"
            [protocol.params]
            period = 3600.0
            [task]
            name = "digits"
            n_nodes = 3
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import gc, json, os, sys
        import p2pfl.daemon.node as node
        from p2pfl.cli import main
        from p2pfl.daemon.notify import SystemdNotifier

        seen = {{}}
        prepare = node.prepare

        def watched_prepare(*args, **kwargs):
            seen["gc_in_prepare"] = gc.isenabled()
            return prepare(*args, **kwargs)

        def ready(self, status=""):
            seen["gc_at_ready"] = gc.isenabled()
            seen["frozen"] = gc.get_freeze_count()
            seen["loaded"] = [m for m in {NOT_BEFORE_A_LINK!r} if m in sys.modules]
            seen["signaling"] = "p2pfl.daemon.signaling" in sys.modules
            print(json.dumps(seen), flush=True)
            os._exit(0)  # all there is to see is seen

        node.prepare = watched_prepare
        SystemdNotifier.ready = ready
        main(["run", "--config", {str(tmp_path / "p2pfl.toml")!r}])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == []
    assert seen["signaling"]
    assert seen["gc_in_prepare"] is False
    assert seen["gc_at_ready"] is True
    assert seen["frozen"] > 50_000  # torch's and p2pfl's objects, not a handful
