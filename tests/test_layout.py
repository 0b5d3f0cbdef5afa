"""The package's shape: no import circle among the project's modules, imports point one way, modules stay small."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("anoddpm", "noise", "eval", "deploy")
MAX_LINES = 420  # "a module past ~400 lines gets split by concern"
# sub-package of anoddpm -> the sub-packages it may import (cli -> training/detection -> model/data -> noise)
ALLOWED = {
    "config": set(),
    "platform": set(),
    "version": set(),
    "data": {"config", "platform"},
    "model": {"config", "data"},
    "bundle": {"config", "platform", "version"},
    "detection": {"config", "platform", "data", "model", "bundle"},
    "training": {"config", "platform", "data", "model", "bundle", "detection"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its text (function-level imports too)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                    if isinstance(node, ast.ImportFrom):
                        break  # `from a.b import c`: c itself when it is a module, else a.b
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_the_project_modules() -> None:
    assert _cycles(_imports(_modules())) == []


def test_anoddpm_sub_packages_import_one_way() -> None:
    wrong = []
    for name, targets in _imports(_modules()).items():
        parts = name.split(".")
        if parts[0] != "anoddpm" or len(parts) < 2 or parts[1] not in ALLOWED:
            continue
        for target in targets:
            tparts = target.split(".")
            if tparts[0] == "anoddpm" and len(tparts) > 1 and tparts[1] != parts[1]:
                if tparts[1] not in ALLOWED[parts[1]]:
                    wrong.append(f"{name} -> {target}")
            elif tparts[0] == "deploy":
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_eval_and_noise_do_not_import_anoddpm() -> None:
    graph = _imports(_modules())
    assert [f"{m} -> {t}" for m, ts in graph.items() for t in ts
            if m.split(".")[0] in ("eval", "noise") and t.split(".")[0] == "anoddpm"] == []


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
