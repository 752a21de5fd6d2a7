"""The protocols package stays sans-IO: no runtime, tensor, network or clock imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import p2pfl.protocols

FORBIDDEN = {"trio", "torch", "aiortc", "zeroconf", "socket", "time", "asyncio", "numpy"}
PACKAGE = Path(p2pfl.protocols.__file__).parent


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_io_clock_or_tensor_libraries() -> None:
    sources = sorted(PACKAGE.glob("*.py"))
    assert len(sources) >= 8
    offenders = {
        path.name: _imports(ast.parse(path.read_text())) & FORBIDDEN
        for path in sources
        if _imports(ast.parse(path.read_text())) & FORBIDDEN
    }
    assert offenders == {}


def test_random_is_only_used_as_the_injected_random_class() -> None:
    # `import random` is fine for the `random.Random` type; module-level state
    # (random.random(), random.seed(), `from random import choice`) is not.
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "random":
                assert [a.name for a in node.names] == ["Random"], path.name
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "random"
            ):
                assert node.attr == "Random", f"{path.name}:{node.lineno} uses random.{node.attr}"


def test_importing_the_package_loads_none_of_them_transitively() -> None:
    code = (
        "import sys, p2pfl.protocols;"
        f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # `time` and `socket` are loaded by the interpreter itself on some platforms; the AST test
    # above covers them. Everything heavy must be absent.
    loaded = set(eval(out.stdout))
    assert loaded <= {"time", "socket"}
