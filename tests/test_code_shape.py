"""The shape of the code a newcomer reads: short functions, and an explicit public surface per module."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenfan", "api", "worker")
#: The most lines a function may have, decorators included, unless a comment on its ``def`` line (or the
#: line above) starts with ``# long:`` and says why.
MAX_FUNCTION_LINES = 50


def sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_function_is_longer_than_fifty_lines_unless_it_says_why() -> None:
    too_long = []
    for path in sources():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            length = (node.end_lineno or node.lineno) - first + 1
            excused = any("# long:" in lines[i - 1] for i in (node.lineno, first - 1) if i >= 1)
            if length > MAX_FUNCTION_LINES and not excused:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "split these, or say why with '# long: ...' on the def line:\n" + "\n".join(too_long)


@pytest.mark.parametrize("path", sources(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_module_names_its_public_surface(path: Path) -> None:
    """`__all__` lists what a module offers, and every name in it exists (a stale entry is a broken promise)."""
    tree = ast.parse(path.read_text())
    declares = any(
        isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
        for node in tree.body
    )
    defines = any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and not node.name.startswith("_")
        for node in tree.body
    )
    if not defines:
        return  # a package's face or an entry point: nothing of its own to list
    assert declares, f"{path.relative_to(REPO)} defines public names but has no __all__"
    module = importlib.import_module(module_name(path))
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module.__name__}.__all__ names what it does not define: {missing}"
