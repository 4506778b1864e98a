"""Print the import cycles between peftune's modules; exit 1 when there is one.

Every import counts, at module level or inside a function (a function-local import that
closes a cycle is still a cycle, only a hidden one). A package's `__init__` counts as its
own module; `from peftune.x import name` depends on `peftune.x` and, when `name` is itself a
submodule, on `peftune.x.name`.

    python3 scripts/import_cycles.py           # cycles, or "no import cycles among N modules"
    python3 scripts/import_cycles.py --edges   # also every module's peftune imports
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "peftune"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """peftune's modules by dotted name."""
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The peftune modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # peftune.a.b.func -> peftune.a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def package_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """Importing peftune.a.b runs peftune/__init__ and peftune/a/__init__ first: not a
    dependency of the importer's design, so those edges are left out."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(modules)


def graph_of(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) - package_parents(name, modules)
            for name, path in modules.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every module's imports")
    args = parser.parse_args()
    graph = graph_of()
    if args.edges:
        for name in sorted(graph):
            print(f"{name}: {', '.join(sorted(graph[name])) or '-'}")
    found = cycles(graph)
    for component in found:
        inner = {m: sorted(graph[m] & set(component)) for m in component}
        print(f"cycle of {len(component)} modules:")
        for module, targets in inner.items():
            print(f"  {module} -> {', '.join(targets)}")
    if not found:
        print(f"no import cycles among {len(graph)} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
