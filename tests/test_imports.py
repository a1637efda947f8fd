"""The import graph of difflab points down: no module imports, directly or through others, a module that
imports it. Read from the source (ast), so imports inside functions count as much as those at the top; only
``if TYPE_CHECKING:`` blocks are left out (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules(root: Path = SRC / "difflab") -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's ``__init__``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those inside ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if isinstance(test, (ast.Name, ast.Attribute)) and getattr(test, "id", getattr(test, "attr", "")) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _owner(name: str, mods) -> str | None:
    """The module that defines dotted ``name`` (a module itself, or a name inside one)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, package: bool, mods) -> set[str]:
    """The difflab modules that module ``name`` imports."""
    here = name if package else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        found |= {o for t in targets if t.split(".")[0] == "difflab" and (o := _owner(t, mods)) and o != name}
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, package, mods) for name, (path, package) in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as its path [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_are_read_at_every_level(tmp_path):
    pkg = tmp_path / "difflab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .low import f\n")
    (pkg / "sub" / "low.py").write_text("def f():\n    from difflab.top import g\n")
    (pkg / "top.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from difflab.sub import f\n"
                                "from difflab.sub import low\n")
    mods = modules(pkg)
    graph = {n: imports_of(n, p, k, mods) for n, (p, k) in mods.items()}
    assert graph == {"difflab": set(), "difflab.sub": {"difflab.sub.low"}, "difflab.sub.low": {"difflab.top"},
                     "difflab.top": {"difflab.sub.low"}}
    assert find_cycle(graph) == ["difflab.sub.low", "difflab.top", "difflab.sub.low"]


def test_difflab_imports_are_acyclic():
    graph = import_graph()
    assert len(graph) > 50 and graph["difflab.training.trainer"]  # the source was found and read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with every module folded into its top-level part of difflab (``difflab.runs.ema`` ->
    ``difflab.runs``; a single-file module stays itself), leaving out the root package (the public API
    imports everything)."""
    def part(name: str) -> str:
        return ".".join(name.split(".")[:2])

    folded: dict[str, set[str]] = {}
    for name, targets in graph.items():
        if name == "difflab":
            continue
        folded.setdefault(part(name), set()).update(
            part(t) for t in targets if t != "difflab" and part(t) != part(name))
    return folded


def test_package_graph_folds_modules_into_their_parts():
    graph = {"difflab": {"difflab.a"}, "difflab.a": {"difflab.b.x", "difflab"}, "difflab.b.x": {"difflab.b.y"},
             "difflab.b.y": {"difflab.a"}}
    assert package_graph(graph) == {"difflab.a": {"difflab.b"}, "difflab.b": {"difflab.a"}}
    assert find_cycle(package_graph(graph)) == ["difflab.a", "difflab.b", "difflab.a"]


def test_difflab_packages_import_acyclically():
    """Not only modules: no part of difflab (a sub-package or a single-file module) imports a part that
    imports it, e.g. the config never reaches up into ``training/``, the run layer never into the loop."""
    graph = import_graph()
    assert {"difflab.runs", "difflab.methods", "difflab.training"} <= set(package_graph(graph))
    cycle = find_cycle(package_graph(graph))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)
