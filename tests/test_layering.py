"""The import graph: layers only import downwards, and no module cycle exists (docs/architecture.md).

Every `import marble…` in the package counts, those inside functions too: a cycle "worked around"
by a local import is still a cycle.
"""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "marble"

# Lower number = lower layer. A module may import its own package and any lower layer.
LAYERS = {
    "marble": 0, "marble.errors": 0, "marble.config": 0, "marble.fileio": 0, "marble.tensor_file": 0,
    "marble.cpu_features": 0, "marble.threads": 0, "marble.diffusion": 0,
    "marble.models": 1,
    "marble.checkpoints": 2, "marble.data": 2,
    "marble.adapters": 3, "marble.prompts": 3, "marble.hires": 3, "marble.record": 3, "marble.request": 3,
    "marble.png": 4, "marble.pipeline": 4,
    "marble.eval": 5, "marble.train": 5,
    "marble.server": 6,
    "marble.cli": 7, "marble.__main__": 7,
}
# Same-or-lower layer imports that are still forbidden.
FORBIDDEN = {("marble.server", "marble.train"), ("marble.server", "marble.eval")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        here = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from marble.x import y` may import the submodule marble.x.y
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            graph[here].update(n for n in names if n == "marble" or n.startswith("marble."))
    return graph


def layer_of(module: str) -> str:
    for depth in (2, 1):
        key = ".".join(module.split(".")[:depth])
        if key in LAYERS:
            return key
    raise KeyError(module)


def test_every_module_has_a_layer():
    unknown = []
    for module in imports():
        try:
            if layer_of(module) == "marble" and module != "marble":
                unknown.append(module)   # a new top-level module falls back to the root's layer
        except KeyError:
            unknown.append(module)
    assert unknown == [], f"add these to LAYERS here and to docs/architecture.md: {sorted(unknown)}"


def test_imports_only_go_down():
    upward = []
    for a, targets in imports().items():
        for b in targets:
            la, lb = layer_of(a), layer_of(b)
            if la != lb and (LAYERS[lb] > LAYERS[la] or (la, lb) in FORBIDDEN):
                upward.append(f"{a} -> {b}")
    assert upward == []


def test_no_module_cycle():
    graph = imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert cycles == []
