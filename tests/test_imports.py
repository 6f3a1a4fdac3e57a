"""No import cycle inside graphcache: every module's imports, top-level and deferred (inside a
function) alike, form a directed acyclic graph. A deferred import that closes a cycle works only
as long as nobody calls it at import time; the layering rule is that none exists."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import graphcache

PACKAGE = Path(graphcache.__file__).parent


def module_name(path: Path) -> str:
    parts = ["graphcache", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The graphcache modules that `name` (at `path`) imports, deferred imports included. Importing
    a.b.c also runs the packages a.b and a, but those edges are Python's, not a layering choice,
    except where a package's own __init__ imports its parent's modules; they are not counted."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> nx.DiGraph:
    found = modules()
    graph = nx.DiGraph()
    for name, path in found.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in imported(name, path, set(found)))
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert graph.number_of_nodes() > 30 and graph.number_of_edges() > 60  # the walk found the package
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_the_walk_sees_deferred_and_relative_imports():
    graph = import_graph()
    assert graph.has_edge("graphcache.runtime", "graphcache.exporters")  # from .exporters import get_backend
    assert graph.has_edge("graphcache.exporters", "graphcache.exporters.eager")  # deferred, in get_backend
    assert graph.has_edge("graphcache.passes.functionalize", "graphcache.ir")  # from .. import ir
    assert not graph.has_edge("graphcache.exporters.export", "graphcache.runtime")
