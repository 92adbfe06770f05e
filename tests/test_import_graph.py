"""The package's import graph: no cycles, layers that point one way, entry points that are leaves.

Read statically from the source (every `import`, at module level or inside a function, `TYPE_CHECKING` ones
included), so an import moved into a function to dodge a cycle still counts. `python tests/test_import_graph.py`
prints the cycles and the upward imports it finds.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "text2img"

# Bottom to top: a module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("text2img.types", "text2img.errors", "text2img.utils"),
    ("text2img.data", "text2img.encoders", "text2img.prompts", "text2img.fusion"),
    ("text2img.conditioning", "text2img.sampling", "text2img.networks"),
    ("text2img.generators",),
    ("text2img.metrics",),
    ("text2img.pipeline",),
    ("text2img.lightning", "text2img.callbacks"),
    ("text2img.run",),
    ("text2img.inspect",),
    ("text2img.webapp",),
    ("text2img.train", "text2img.sample", "text2img.evaluate", "text2img.export", "text2img.demo"),
]
ENTRY_POINTS = LAYERS[-1]
# Training code: what runs a training step, which must not need the evaluation's metrics.
TRAINING = ("text2img.generators", "text2img.lightning", "text2img.fusion", "text2img.encoders", "text2img.conditioning")
EVALUATION = ("text2img.metrics",)
# The package root registers the config resolvers (text2img.run.resolvers) on import, so that any config composes;
# `from text2img import x` is an import of x.
EXEMPT = {"text2img"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the text2img modules it imports (a name inside a module resolves to that module)."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("text2img") else None
                if target is not None and target != module and target not in EXEMPT:
                    graph[module].add(target)
    return {module: graph.get(module, set()) for module in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if within(module, prefixes):
            return rank
    raise KeyError(f"{module} is in no layer; add it to LAYERS in tests/test_import_graph.py")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a higher layer, of an entry point, or of evaluation code by training code."""
    found = []
    for module, targets in sorted(graph.items()):
        if module in EXEMPT:
            continue
        for target in sorted(targets):
            if within(target, ENTRY_POINTS) or layer_of(target) > layer_of(module):
                found.append(f"{module} -> {target}")
            elif within(module, TRAINING) and within(target, EVALUATION):
                found.append(f"{module} -> {target} (training code importing evaluation code)")
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = [module for module in modules() if module not in EXEMPT and not any(
        within(module, prefixes) for prefixes in LAYERS)]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_layers_point_one_way() -> None:
    assert upward_imports(import_graph()) == []


def test_the_checks_catch_what_they_look_for() -> None:
    """The graph checks on a made-up graph: a cycle through three modules, an entry point imported, an upward import."""
    graph = {
        "text2img.data.a": {"text2img.data.b"},
        "text2img.data.b": {"text2img.data.c"},
        "text2img.data.c": {"text2img.data.a", "text2img.train"},
        "text2img.utils.x": {"text2img.generators.y"},
        "text2img.generators.y": {"text2img.metrics.z"},
        "text2img.metrics.z": set(),
        "text2img.train": set(),
    }
    assert cycles(graph) == [["text2img.data.a", "text2img.data.b", "text2img.data.c"]]
    assert upward_imports(graph) == [
        "text2img.data.c -> text2img.train",
        "text2img.generators.y -> text2img.metrics.z",
        "text2img.utils.x -> text2img.generators.y",
    ]


if __name__ == "__main__":
    graph = import_graph()
    problems = [" <-> ".join(cycle) for cycle in cycles(graph)] + upward_imports(graph)
    print("\n".join(problems) or f"{len(graph)} modules: no cycles, every import points down")
    sys.exit(1 if problems else 0)
