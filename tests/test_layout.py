"""The dependency direction of the layout (README "Layout"), read from every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> top-level packages it must never import (lazily inside a function included)
FORBIDDEN = {
    "actors": {"driftrl", "learner"},
    "learner": {"driftrl"},
    "buffers": {"driftrl", "actors", "learner"},
    "tasks": {"driftrl", "actors", "learner"},
    "transports": {"driftrl", "actors", "learner"},
    "settings": {"driftrl", "actors", "learner", "buffers", "tasks", "transports"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layout(package: str) -> None:
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules, package
    wrong = {str(m.relative_to(REPO)): sorted(imported_packages(m) & FORBIDDEN[package]) for m in modules}
    assert {m: bad for m, bad in wrong.items() if bad} == {}


def test_the_checker_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from driftrl.pipeline import Driver\n    import learner.engine\n")
    assert imported_packages(module) == {"driftrl", "learner"}
