"""The package's shape, kept true by scanning its source: layers that point down, no import
circles, modules and functions of a size a reader can hold, and one home per choice list.

The layer order is read from ARCHITECTURE.md ("Layers" table), so the document and the code
cannot drift apart: a module missing from the table, or an import that runs up the table
(lazily or not; imports under ``TYPE_CHECKING`` aside), fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hdd_ray"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """The ``hdd_ray`` modules ``name`` imports anywhere (functions included), except under
    ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from hdd_ray import storage`` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != name and m != "hdd_ray"}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layers() -> list[list[str]]:
    """ARCHITECTURE.md's layer table, bottom first: each row's modules as dotted prefixes."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("layer", "") or set(cells[0]) <= {"-", " "}:
            continue
        names = re.findall(r"`([\w/]+?)(?:\.py|/)?`", cells[1])
        rows.append(["hdd_ray." + n.replace("/", ".") for n in names])
    return rows


LAYERS = _layers()


def _layer_of(module: str) -> int | None:
    best, index = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    return index


def test_every_module_has_a_layer_in_architecture_md():
    assert len(LAYERS) >= 10, LAYERS
    missing = [m for m in MODULES if m != "hdd_ray" and _layer_of(m) is None]
    assert not missing, f"modules with no row in ARCHITECTURE.md's layer table: {missing}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, targets in GRAPH.items():
        here = _layer_of(module)
        for target in targets:
            there = _layer_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{module} (layer {here}) imports {target} (layer {there})")
    assert not upward, "\n".join(sorted(upward))


def test_there_is_no_import_circle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
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
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_the_scan_sees_lazy_imports_and_ignores_type_checking_ones(tmp_path):
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hdd_ray.sweep import x\n"
           "def f():\n    from hdd_ray.cli import parse_job_args\n")
    path = tmp_path / "probe.py"
    path.write_text(src)
    assert _imports("hdd_ray.storage", path) == {"hdd_ray.cli"}


def test_modules_over_500_lines_say_why():
    long = []
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_MODULE_LINES:
            doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
            if "long because" not in " ".join(doc.split("\n")[:6]).lower():
                long.append(f"{name}: {len(lines)} lines")
    assert not long, f"over {MAX_MODULE_LINES} lines without 'long because' in the docstring: {long}"


def test_no_function_is_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {size} lines")
    assert not long, long


@pytest.mark.parametrize("registry, names", [
    ("hdd_ray.diffusion.objectives:OBJECTIVES", "OBJECTIVE_NAMES"),
    ("hdd_ray.diffusion.schedules:SCHEDULES", "SCHEDULE_NAMES"),
])
def test_registries_keyed_by_classes_list_exactly_the_config_choices(registry, names):
    import importlib

    from hdd_ray import choices

    module, attr = registry.split(":")
    assert tuple(getattr(importlib.import_module(module), attr)) == getattr(choices, names)


def test_config_loads_without_torch():
    import subprocess
    import sys

    code = ("import sys, hdd_ray.config, hdd_ray.cli; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
