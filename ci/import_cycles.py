"""Import cycles between sparktune's modules, found from the source (nothing is imported).

Module-level imports (``TYPE_CHECKING`` blocks excluded) must form no cycle: exit status 1 names
each. With ``--all``, imports inside functions count too (a cycle that such an import hides is
still two modules that each need the other); ``--among A B ...`` limits that check to cycles
that pass through the named modules (e.g. ``--among sparktune.tokenize sparktune.instruct``).

    python ci/import_cycles.py [--all] [--among MODULE ...]
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(package: str = "sparktune") -> dict[str, str]:
    """{dotted name: file} of every module of ``package``."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str, path: str, known: dict[str, str]) -> list[tuple[str, bool]]:
    """(imported sparktune module, at module level?) for each import in ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((m, top) for a in child.names if (m := resolve(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                for alias in child.names:
                    target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base)
                    if target:
                        found.append((target, top))
            visit(child, inner)

    visit(tree, True)
    return [(m, top) for m, top in found if m != module]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def graph_of(include_local: bool) -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for target, top in imports(module, path, known):
            if top or include_local:
                # importing a.b.c runs a and a.b first: those are edges too
                graph[module].add(target)
    return graph


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="count imports inside functions too")
    parser.add_argument("--among", nargs="*", default=[], help="with --all: only cycles through these modules")
    args = parser.parse_args(argv)
    status = 0
    for component in cycles(graph_of(False)):
        print("module-level import cycle: " + " <-> ".join(component))
        status = 1
    if args.all:
        for component in cycles(graph_of(True)):
            if not args.among or any(m in component for m in args.among):
                shown = [m for m in component if not args.among or m in args.among]
                print(f"import cycle with function-local imports ({len(component)} modules): "
                      + " <-> ".join(shown if args.among else component))
                status = 1
    if status == 0:
        print("no import cycle" + (" (function-local imports included)" if args.all else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
