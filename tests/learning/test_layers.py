"""The package's layers: who may import whom, and no import cycles (imports inside functions too).

Read from the source with ``ast`` rather than by importing, so an import hidden in a function
body counts as much as one at the top of the module. Imports under ``if TYPE_CHECKING:`` do not
count (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import p2pfl

ROOT = Path(p2pfl.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(module: str) -> set[str]:
    """The p2pfl modules ``module`` imports anywhere in its source (resolved, submodules named)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        for alias in node.names:
            submodule = f"{origin}.{alias.name}"
            targets.add(submodule if submodule in MODULES else origin)
    return {t for t in targets if t in MODULES and t != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _offenders(importer: str, forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    return {
        module: {t for t in targets if any(_under(t, f) for f in forbidden)}
        for module, targets in GRAPH.items()
        if _under(module, importer) and any(_under(t, f) for f in forbidden for t in targets)
    }


def test_the_walk_sees_imports_inside_functions() -> None:
    # node.py imports the trainer inside prepare(): the walk must see it.
    assert "p2pfl.daemon.trainer" in GRAPH["p2pfl.daemon.node"]
    assert "p2pfl.learning.ops" in GRAPH["p2pfl.daemon.node"]


def test_the_daemon_never_imports_the_simulator() -> None:
    assert _offenders("p2pfl.daemon", ("p2pfl.sim",)) == {}


def test_the_learning_layer_imports_neither_daemon_nor_simulator() -> None:
    assert any(_under(m, "p2pfl.learning") for m in MODULES)
    assert _offenders("p2pfl.learning", ("p2pfl.daemon", "p2pfl.sim", "p2pfl.cli")) == {}


def test_the_layers_below_import_nothing_above_them() -> None:
    above = ("p2pfl.learning", "p2pfl.daemon", "p2pfl.sim", "p2pfl.cli")
    assert _offenders("p2pfl.ml", above) == {}
    assert _offenders("p2pfl.protocols", (*above, "p2pfl.ml")) == {}


def _cycles() -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            connect(module)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    saved = dict(GRAPH)
    try:
        GRAPH["p2pfl.ml.task"] = GRAPH["p2pfl.ml.task"] | {"p2pfl.ml.catalog"}
        assert any({"p2pfl.ml.catalog", "p2pfl.ml.task"} <= set(c) for c in _cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_the_setup_description_and_the_runtime_load_no_torch() -> None:
    """Configuration loaders (the daemon's, the scenario parser) check a setup without torch."""
    import subprocess
    import sys

    code = (
        "import sys, p2pfl.learning.setup, p2pfl.learning.runtime, p2pfl.tomlkeys;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert GRAPH["p2pfl.tomlkeys"] == set()
