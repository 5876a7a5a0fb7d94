"""The import rules between pagedserve's layers, checked by reading the source (ast, no import).

Every ``import``/``from ... import`` counts, at module level or inside a function, and so do the
imports of the project's modules it reaches: a layer that reaches torch through a helper knows
about torch just the same. ``import a.b.c`` reaches the module ``a.b.c``, not the package
``__init__`` files on the way (their re-exports are for users, not for the layers); ``from a
import b`` reaches ``a.b`` when that is a module, else ``a``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ENGINE = "pagedserve"
KERNELS = "pagedserve_kernels"
# What the kernels package may import besides itself and the standard library.
KERNEL_DEPENDENCIES = frozenset({"torch", "triton", "numpy"})
# The tensor-parallel collectives: torch.distributed and nothing else of the project, so that
# any layer (models, worker, a future executor) may use them.
DISTRIBUTED = f"{ENGINE}.distributed"
DISTRIBUTED_DEPENDENCIES = frozenset({"torch"})
# Packages that import only their own modules, these dependencies and the standard library.
SELF_CONTAINED = (
    (KERNELS, KERNEL_DEPENDENCIES, "the kernels import only torch, triton, numpy and themselves"),
    (DISTRIBUTED, DISTRIBUTED_DEPENDENCIES, "pagedserve.distributed imports only torch and itself"),
)


@dataclass(frozen=True)
class Rule:
    """Modules under ``layer`` must not reach a module under any of ``forbidden``."""

    layer: str
    forbidden: tuple[str, ...]
    why: str


RULES = (
    Rule(f"{ENGINE}.core", ("torch",), "the scheduler and KV manager know nothing about torch"),
    *(
        Rule(f"{ENGINE}.{layer}",
             tuple(f"{ENGINE}.{up}" for up in ("core", "engine", "worker", "serving",
                                                "entrypoints")),
             "model code knows nothing about scheduling, the engine or serving")
        for layer in ("models", "layers", "attention")
    ),
    Rule(f"{ENGINE}.engine", (f"{ENGINE}.serving", "triton_python_backend_utils"),
         "the engine runs without Triton"),
    Rule(f"{ENGINE}.executor",
         tuple(f"{ENGINE}.{up}" for up in ("engine", "serving", "entrypoints")),
         "the executor runs the steps the engine hands it and knows nothing above"),
)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_imports(path: Path, name: str) -> set[tuple[str, ...]]:
    """What ``path`` (module ``name``) imports: for each name, the module names it may be, most
    specific first (``from a import b`` is the module ``a.b`` if there is one, else ``a``);
    relative imports resolved."""
    is_package = path.name == "__init__.py"
    found: set[tuple[str, ...]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name,) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")
                package = package[: len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            found.update((f"{base}.{alias.name}", base) for alias in node.names)
    return found


def import_graph(roots: Iterable[Path]) -> dict[str, set[str]]:
    """Each project module -> the modules it imports: project modules by their full name,
    anything else by its top-level name. Covers every ``.py`` under the given source roots."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[module_name(root, path)] = path
    graph = {}
    for name, path in files.items():
        edges = set()
        for candidates in read_imports(path, name):
            module = next((c for c in candidates if c in files), None)
            edges.add(module or candidates[-1].split(".")[0])
        edges.discard(name)
        graph[name] = edges
    return graph


def reachable(graph: Mapping[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` reaches -> the module that imports it on the first path found."""
    via: dict[str, str] = {}
    stack = [start]
    while stack:
        here = stack.pop()
        for nxt in graph.get(here, ()):
            if nxt not in via and nxt != start:
                via[nxt] = here
                stack.append(nxt)
    return via


def _path(via: Mapping[str, str], start: str, end: str) -> str:
    chain = [end]
    while chain[-1] != start:
        chain.append(via[chain[-1]])
    return " -> ".join(reversed(chain))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(roots: Iterable[Path]) -> list[str]:
    """Every broken rule, as 'layer module -> ... -> forbidden module (why)'; [] when none."""
    graph = import_graph(roots)
    found = []
    for name in sorted(graph):
        via = reachable(graph, name)
        for rule in RULES:
            if not _under(name, rule.layer):
                continue
            for target in sorted(via):
                if any(_under(target, f) for f in rule.forbidden):
                    found.append(f"{_path(via, name, target)} ({rule.why})")
        for package, dependencies, why in SELF_CONTAINED:
            if not _under(name, package):
                continue
            allowed = dependencies | set(sys.stdlib_module_names)
            for target in sorted(graph[name]):
                if not _under(target, package) and target not in allowed:
                    found.append(f"{name} -> {target} ({why})")
    found += [f"import cycle among {', '.join(group)}" for group in cycles(graph)]
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The groups of project modules that import each other, directly or around a circle
    (strongly connected components of more than one module, Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups
