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
