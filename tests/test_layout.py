"""Imports point down only (docs/architecture.md), checked on the source without importing it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "exits"
TOP = ("exits.train", "exits.label", "exits.pipeline", "exits.evaluate", "exits.report")
# folder or module -> the exits modules it must not import (prefix match)
FORBIDDEN = {
    "method": (*TOP, "exits.data", "exits.model", "exits.inference", "exits.stage2"),
    "data": (*TOP, "exits.method", "exits.model", "exits.inference", "exits.stage2"),
    "model": (*TOP, "exits.method", "exits.data", "exits.inference", "exits.stage2"),
    "inference.py": (*TOP, "exits.stage2"),
    "label": ("exits.train", "exits.pipeline", "exits.evaluate", "exits.report"),
    "evaluate": ("exits.train", "exits.label", "exits.pipeline", "exits.report"),
    # the report draws only: no training, no model, no method, no inference
    "report": (
        "exits.train",
        "exits.pipeline",
        "exits.method",
        "exits.model",
        "exits.inference",
        "exits.checkpoints",
        "exits.stage2",
        "exits.label",
    ),  # fmt: skip
}
PENDING: dict[str, set[str]] = {}  # allowed exceptions while a move is under way (none now)


def exits_imports(path: Path) -> set[str]:
    """Every ``exits`` module imported anywhere in the file (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "exits")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "exits" or m.startswith("exits.")}


def _files(part: str) -> list[Path]:
    target = PKG / part
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_point_down(part):
    bad = {}
    for path in _files(part):
        hits = {
            m
            for m in exits_imports(path)
            for f in FORBIDDEN[part]
            if (m == f or m.startswith(f + ".")) and m not in PENDING.get(part, set())
        }
        if hits:
            bad[str(path.relative_to(PKG))] = sorted(hits)
    assert not bad, f"upward imports: {bad}"


def test_checker_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from exits import storage\n\ndef f():\n    from exits.train.data import X\n")
    assert exits_imports(src) == {"exits", "exits.storage", "exits.train.data"}


# --------------------------------------------------------------------------- import cycles
# cycles that exist today in files other sessions own (remove an entry when its cycle goes)
KNOWN_CYCLES = {frozenset({"exits.config", "exits.model.generator"})}


def module_graph() -> dict[str, set[str]]:
    """exits module -> the exits modules it imports (anywhere in the file). ``from pkg import
    sub`` counts as importing the submodule ``pkg.sub`` (a package re-exporting its children
    is not a dependency of the children on it)."""
    names = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & names.keys()
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_no_import_cycles_beyond_the_known_ones():
    """Issue 23 item 9: data/coco <-> data/prepare <-> data/validate was a circle; now
    ``prepare`` -> ``coco`` -> ``validate`` and no exits.data module is on any cycle."""
    found = cycles(module_graph())
    assert not [c for c in found if any(m.startswith("exits.data") for m in c)], found
    assert set(found) <= KNOWN_CYCLES, f"new import cycles: {set(found) - KNOWN_CYCLES}"


def test_cycle_finder_sees_a_circle_through_a_function_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []
