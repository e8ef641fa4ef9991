"""The layout issue #12 fixed, checked by reading the sources (no imports run, well under a second).

- harness/ (package ``moebench``) has no import cycle, lazy imports inside functions included;
- no plugin imports another plugin family's private (``_name``) helper, and harness imports no plugin;
- harness/ has no module that only one plugin family uses: what one family needs lives in its
  folder under plugins/, what harness keeps is shared.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moebench": ROOT / "harness", "moebench_plugins": ROOT / "plugins"}


def _module_of(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if folder in path.parents:
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise ValueError(path)


#: module name -> source file, for both packages
SOURCES = {_module_of(p): p for folder in PACKAGES.values() for p in sorted(folder.rglob("*.py"))}


@lru_cache(maxsize=None)
def _nodes(module: str) -> tuple[ast.AST, ...]:
    """Every node of a module's syntax tree (parsed once)."""
    path = SOURCES[module]
    return tuple(ast.walk(ast.parse(path.read_text(), str(path))))


@lru_cache(maxsize=None)
def _imports(module: str) -> list[tuple[str, str | None, str | None]]:
    """``(imported module, imported name or None, local name or None)`` for every import of a
    module at any depth (lazy imports in functions too).

    Relative imports are resolved; ``from pkg import name`` where ``pkg.name`` is a module
    counts as an import of that module (bound to a local name).
    """
    path = SOURCES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, str | None, str | None]] = []
    for node in _nodes(module):
        if isinstance(node, ast.Import):
            out += [(a.name, None, a.asname) for a in node.names]  # ``import a.b`` binds ``a``: no module alias
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, a.asname or a.name) if sub in SOURCES else (base, a.name, a.asname or a.name))
    return out


def _family(module: str) -> str | None:
    """The plugin family folder of a ``moebench_plugins`` module (None for harness modules)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "moebench_plugins" and len(parts) > 1 else None


def _harness(module: str) -> bool:
    return module.split(".")[0] == "moebench"


def test_no_import_cycle_in_harness():
    graph = {m: {t for t, _, _ in _imports(m) if t in SOURCES and _harness(t) and t not in (m, "moebench")} for m in SOURCES if _harness(m)}
    assert len(graph) > 30 and graph["moebench.runner"]  # the scan found the package and its imports
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles in harness/: " + "; ".join(" -> ".join(c) for c in cycles)


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def test_no_plugin_imports_another_familys_private_name():
    found = []
    for module in SOURCES:
        mine = _family(module)
        aliases = {}  # local name -> another family's module bound to it
        for target, name, local in _imports(module):
            theirs = _family(target)
            if theirs is None or theirs == mine:
                continue
            if _private(name):
                found.append(f"{module} imports {target}.{name}")
            elif name is None and local:
                aliases[local] = target
        for node in _nodes(module):  # module._helper on a module of another family
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases and _private(node.attr):
                found.append(f"{module} reads {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used across plugin families: " + "; ".join(found)


def test_harness_imports_no_plugin():
    found = [f"{m} imports {t}" for m in SOURCES if _harness(m) for t, _, _ in _imports(m) if t.split(".")[0] == "moebench_plugins"]
    assert not found, "harness/ names built-in plugins: " + "; ".join(found)


def test_no_harness_module_serves_only_one_family():
    users: dict[str, set[str]] = {m: set() for m in SOURCES if _harness(m)}
    for module in SOURCES:
        who = _family(module) or "harness"
        for target, _, _ in _imports(module):
            if target in users and target != module:
                users[target].add(who)
    assert users["moebench.adapter"] >= {"harness", "fusion", "trimming"}  # the scan sees uses from both packages
    single = {m: u.pop() for m, u in users.items() if len(u) == 1 and "harness" not in u}
    assert not single, "harness modules only one plugin family uses (move them into plugins/<family>/): " + ", ".join(f"{m} ({f})" for m, f in sorted(single.items()))
