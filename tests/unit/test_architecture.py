"""The dependency direction, read from the source: the core never reaches up into its tooling,
the thin client needs only the contract and the query rule, and no two modules import each other.

Every import counts, including the ones inside functions that exist to defer a heavy
dependency: deferring an import does not change which way it points."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.project import PROJECT_ROOT

# Source directory of each top-level package of the distribution (pyproject's package-dir).
SOURCE_DIRS = {
    "ecomsearch": PROJECT_ROOT / "ecomsearch",
    "ecomsearch.client": PROJECT_ROOT / "client",
    "ecomsearch.export": PROJECT_ROOT / "export",
    "ecomsearch.loadtest": PROJECT_ROOT / "loadtest",
}
# Tooling: commands and harnesses that drive the core. They may import anything.
TOOLING = (
    "ecomsearch.cli",
    "ecomsearch.server",
    "ecomsearch.export",
    "ecomsearch.loadtest",
    "ecomsearch.evaluation.harness",
    # the relevance gate drives the eval harness on its sample
    "ecomsearch.evaluation.gate",
    # eval-recs: starts its own server, like `ecomsearch eval`'s harness.
    "ecomsearch.recommend.evaluation",
)
CLIENT = "ecomsearch.client"
# What the thin client may import from the rest of the package: the contract, and the query
# rule it applies before sending (which needs only the contract, the errors and numpy).
CLIENT_MAY_IMPORT = ("ecomsearch.contract", "ecomsearch.query", "ecomsearch.errors")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, Path]:
    modules = {}
    for package, directory in SOURCE_DIRS.items():
        for path in directory.rglob("*.py"):
            relative = path.relative_to(directory).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            if "backends" in parts:  # a Triton backend's model.py, loaded by path, not imported
                continue
            modules[".".join([package, *parts])] = path
        # Sub-packages mapped elsewhere are not part of the `ecomsearch` directory's walk.
    return modules


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[str]:
    """First-party modules `module` imports, resolving `from package import submodule`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name == "ecomsearch" or name.startswith("ecomsearch."):
                yield name


GRAPH = {module: set(_imports(module, path)) - {module} for module, path in MODULES.items()}


def test_the_walk_sees_the_whole_package() -> None:
    assert {"ecomsearch.serving.base", "ecomsearch.client.sync", "ecomsearch.export.onnx"} <= set(
        MODULES
    )
    assert "ecomsearch.export.onnx" in GRAPH["ecomsearch.export.encoder"]
    assert "ecomsearch.contract" in GRAPH["ecomsearch.client.protocol"]


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if not _within(m, (*TOOLING, CLIENT)) and m != "ecomsearch")
)
def test_the_core_never_imports_its_tooling(module: str) -> None:
    reaching_up = sorted(name for name in GRAPH[module] if _within(name, TOOLING))
    assert reaching_up == [], f"{module} imports tooling; pass what it needs in instead"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, (CLIENT,))))
def test_the_client_imports_only_the_contract(module: str) -> None:
    outside = sorted(
        name for name in GRAPH[module] if not _within(name, (CLIENT, *CLIENT_MAY_IMPORT))
    )
    assert outside == [], (
        f"{module} imports {outside}: the thin client needs only the contract and the query rule"
    )


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of any length, as strongly connected components (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_two_modules_depend_on_each_other() -> None:
    assert find_cycles(GRAPH) == []


def test_cycles_of_any_length_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_deferred_and_relative_imports_count(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "from . import contract\n"
        "def f():\n"
        "    from ecomsearch.cli import main\n"
        "    import ecomsearch.loadtest.bench\n"
    )
    found = set(_imports("ecomsearch.probe", source))
    assert found == {"ecomsearch.contract", "ecomsearch.cli", "ecomsearch.loadtest.bench"}
    assert all(_within(name, TOOLING) for name in found - {"ecomsearch.contract"})
