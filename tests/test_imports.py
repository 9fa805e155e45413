"""The import structure of proxy/ and listeners/ against the map in ARCHITECTURE.md.

Every module of the two packages has a row in the map's module table with its level. An
import (at module level, inside a function, or under TYPE_CHECKING: all count) must not point
to a module of a higher level, and no imports may form a cycle. The two seams: `listeners/` and
`proxy/devagent/` take from the rest of `proxy/` only level-0 modules. Nothing imports the
console entry point `proxy.main` (or `proxy.__main__`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "listeners")
# A row of the module table: | `proxy/agent.py` | 2 | ... |
ROW = re.compile(r"^\|\s*`((?:proxy|listeners)/[\w/]+\.py)`\s*\|\s*(\d+)\s*\|")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _levels() -> dict[str, int]:
    levels: dict[str, int] = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            levels[_module_name(ROOT / match.group(1))] = int(match.group(2))
    return levels


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that `import name` (or `from name import x`) loads, if any."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (a `from pkg import mod` counts as mod)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_level_in_the_map() -> None:
    levels = _levels()
    modules = set(_modules())
    assert sorted(modules - set(levels)) == [], "modules missing from ARCHITECTURE.md's table"
    assert sorted(set(levels) - modules) == [], "ARCHITECTURE.md lists modules that are gone"


def test_imports_point_only_down() -> None:
    levels = _levels()
    upward = [
        f"{src} (level {levels[src]}) imports {dst} (level {levels[dst]})"
        for src, targets in sorted(_graph().items())
        for dst in sorted(targets)
        if src in levels and dst in levels and levels[dst] > levels[src]
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_seams_take_only_level_0_from_proxy() -> None:
    levels = _levels()
    crossings = [
        f"{src} imports {dst}"
        for src, targets in sorted(_graph().items())
        if src.startswith(("listeners", "proxy.devagent"))
        for dst in sorted(targets)
        if dst.startswith("proxy")
        and not dst.startswith("proxy.devagent")
        and levels.get(dst) != 0
        and not (src.startswith("proxy.devagent") and dst.startswith("proxy.devagent"))
    ]
    assert crossings == []


def test_nothing_imports_the_entry_point() -> None:
    importers = [
        src
        for src, targets in _graph().items()
        if {"proxy.main", "proxy.__main__"} & targets and src != "proxy.__main__"
    ]
    assert importers == []


def test_the_checker_sees_local_and_relative_imports(tmp_path: Path) -> None:
    """The walk must not miss an import hidden in a function (the way cycles used to hide)."""
    source = "def f():\n    from proxy.supervisor import Proxy\n    return Proxy\n"
    path = tmp_path / "x.py"
    path.write_text(source)
    modules = {"proxy.supervisor": ROOT / "proxy" / "supervisor.py", "proxy.x": path}
    assert _imports("proxy.x", path, modules) == {"proxy.supervisor"}
