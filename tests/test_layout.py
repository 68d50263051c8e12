"""The package's layout: one idea per module, each of a few hundred lines, and no import loop.

Imports are read from the source (module level and inside functions alike, since a function-level import is
still a dependency), so a loop hidden behind a lazy import is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "ddpm"
MAX_LINES = 450  # "about 400": room for a docstring, never a second idea


def _imports(path: Path) -> set[str]:
    """The ddpm modules that ``path`` imports (``from . import x``, ``from .x import y``, ``import ddpm.x``)."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # imports for type annotations only are not dependencies at run time
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("ddpm."):
                found.add(node.module.split(".")[1])
            elif node.module == "ddpm":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ddpm."))
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {m for m in found if m in modules} - {path.stem}


def graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def test_no_import_loop():
    g = graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import loop: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(g):
        if module not in state:
            visit(module, [module])


def test_the_file_layer_and_the_data_sit_below_the_trainer_and_the_cache():
    g = graph()
    # file I/O only, with the random states it saves, atomic writes and the lock beside each checkpoint
    assert g["checkpoint"] <= {"rng", "atomic", "locking"}, g["checkpoint"]
    assert g["atomic"] <= {"locking"} and g["locking"] == set()
    assert g["paths"] == g["rng"] == g["distributed"] == set()
    assert "checkpoint" not in g["data"] and "cache" not in g["data"]
    assert "train" in g["cache"] and "cache" not in g["train"]


def test_every_module_is_a_few_hundred_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
