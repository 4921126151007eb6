"""The package's shape: no import cycle between its modules, counting imports inside functions
too (a cycle dodged by a function-level import is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import nanovllm

ROOT = Path(nanovllm.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for f in ROOT.rglob("*.py"):
        parts = ["nanovllm", *f.relative_to(ROOT).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (not its own ancestors, which
    Python imports first anyway)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets.add(base)
            targets |= {f"{base}.{a.name}" for a in node.names}
    found = set()
    for t in targets:
        while t and t not in known:
            t = t.rpartition(".")[0]
        if t and t != name and not name.startswith(t + "."):
            found.add(t)
    return found


def test_the_import_graph_has_no_cycle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(u: str) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(path[path.index(v) :] + [v]))
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert len(graph) > 40 and graph["nanovllm.llm"], "the walk found too few modules"
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
