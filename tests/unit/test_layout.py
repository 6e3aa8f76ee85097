"""The layout's rules (docs/architecture.md), checked by reading the source (ast, no execution):
no import circle between modules or between sub-packages, no private name imported from another
module, no module over 400 lines without its reason at the top; and, by running it, no torch on the
torch-free side (the core package and the producer)."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hnq", "worker", "producer")
TORCH_FREE = ("hnq", "producer")
MAX_LINES = 400
LONG_MARK = "Long: "   # a module over MAX_LINES says why on a docstring line starting with this


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _target(importer: str, node: ast.ImportFrom | ast.Import, is_pkg: bool) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for each of the node's names."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    if node.level:
        base = importer.split(".") if is_pkg else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    out = []
    for a in node.names:
        # `from pkg import module` imports the module, not a name of pkg
        out.append((f"{mod}.{a.name}", None) if f"{mod}.{a.name}" in MODULES else (mod, a.name))
    return out


def _internal(mod: str) -> str | None:
    while mod and mod not in MODULES:
        mod = mod.rpartition(".")[0]
    return mod or None


def _imports() -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, name or None, line) for every import of our own modules,
    at any depth (imports inside functions count: they are circles all the same)."""
    edges = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in _target(mod, node, path.name == "__init__.py"):
                    t = _internal(target)
                    if t and t != mod:
                        edges.append((mod, t, name, node.lineno))
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1
                    stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _room(mod: str) -> str:
    """A module's room: its sub-package (hnq.jobs, worker.engine, ...); a module directly in a
    top-level package is a room of its own (hnq.schema, worker.tasks, producer.cli)."""
    if MODULES[mod].name == "__init__.py":
        return mod
    parts = mod.split(".")
    return ".".join(parts[:-1]) if len(parts) > 2 else mod


def test_no_import_circle_between_modules():
    graph = defaultdict(set)
    for a, b, _, _ in _imports():
        graph[a].add(b)
    assert _cycles(graph) == []


def test_no_import_circle_between_rooms():
    graph = defaultdict(set)
    for a, b, _, _ in _imports():
        # a room and the rooms inside it (hnq.storage and hnq.storage.s3) are one floor: the facade
        # above uses the backends below, which use the shared types above
        ra, rb = _room(a), _room(b)
        if ra != rb and not rb.startswith(ra + ".") and not ra.startswith(rb + "."):
            graph[ra].add(rb)
    assert _cycles(graph) == []


def test_no_private_name_is_imported_from_another_module():
    found = [f"{MODULES[a].relative_to(ROOT)}:{line}: {name} from {b}"
             for a, b, name, line in _imports()
             if name and name.startswith("_") and not name.startswith("__")]
    assert found == []


def test_no_module_over_the_size_without_its_reason():
    long = []
    for mod, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if not any(line.startswith(LONG_MARK) for line in doc.splitlines()):
                long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert long == []


def test_the_checks_above_can_fail():
    """The circle finder finds a circle (so an empty answer above means something)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("side", TORCH_FREE)
def test_the_torch_free_side_imports_without_torch(side, tmp_path):
    """Every module of the core package and of the producer imports with a `torch` that refuses to
    load on the path, and leaves no torch in sys.modules."""
    fake = tmp_path / "poison" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('this side must not import torch')\n")
    names = [m for m in MODULES if m.split(".")[0] == side]
    code = ("import importlib, sys\n"
            f"for m in {names!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision')))\n"
            "assert not bad, bad\n")
    env = {"PYTHONPATH": f"{tmp_path / 'poison'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
