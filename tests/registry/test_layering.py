"""The registry imports only the core and itself: never the trainer or the runtime, not even
inside a function (the gate of `compress --gate` is handed in by `trainer/cli.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

import loraplex.registry

FORBIDDEN = ("loraplex.trainer", "loraplex.runtime")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_no_registry_module_imports_the_trainer_or_the_runtime() -> None:
    root = Path(loraplex.registry.__file__).parent
    modules = sorted(root.rglob("*.py"))
    assert len(modules) > 10
    bad = [f"{p.relative_to(root)}:{line} imports {name}" for p in modules
           for line, name in _imports(p) if name.startswith(FORBIDDEN)]
    assert bad == []
