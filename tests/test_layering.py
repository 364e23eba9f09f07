"""The house's layering, read from the source: every import (inside functions too).

Subpackages sit on floors; a file may import its own subpackage and the subpackages on
lower floors, nothing above. Third-party rules: only ``distributed/`` imports ray, only
``sim/`` imports robosuite and mujoco. Strings given to ``importlib`` (the scorer
registry's plugins) are not imports and are not checked here.

``EXCEPTIONS`` lists today's upward arrows with the issue that removes them; the test
fails when one disappears (shrink the list) as well as when a new one appears.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cupid_engine"

# Lowest floor first. Same floor: may not import each other unless listed in SIDEWAYS.
FLOORS: list[tuple[str, ...]] = [
    ("_C", "constants", "errors", "__version__"),
    ("config", "executor"),
    ("ops", "data"),
    ("store", "policies"),
    ("featurize", "scorers"),
    ("index", "sim", "distributed"),
    ("facade", "datamodels"),
    ("audit", "explorer"),
    ("demo",),
    ("cli", "__init__"),
    ("__main__",),
]
SIDEWAYS = {
    ("featurize", "scorers"): False,
    ("scorers", "featurize"): False,
    ("distributed", "sim"): True,  # Ray rollout actors run the simulator
    ("distributed", "index"): False,
}
EXCEPTIONS: dict[tuple[str, str], str] = {
    # (importer, imported): why it is still there. None today: featurize and sim take an
    # executor (cupid_engine/executor.py) instead of importing distributed.
}
THIRD_PARTY = {"ray": {"distributed"}, "robosuite": {"sim"}, "mujoco": {"sim"}}


def _floor(sub: str) -> int:
    for i, names in enumerate(FLOORS):
        if sub in names:
            return i
    raise AssertionError(f"subpackage {sub!r} is on no floor: add it to FLOORS in {__file__}")


def _sub(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if path.name == "__init__.py" else rel.parts)] = path
    return out


def _import_targets(mod: str, path: Path, mods: dict[str, Path]):
    """``(line, target)`` for every import in ``path``: ``from pkg import x`` names the
    submodule ``pkg.x`` when there is one, else ``pkg``; the compiled ``_C`` is a leaf."""
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            for a in node.names:
                full = f"{root}.{a.name}"
                if full == "cupid_engine._C":
                    yield node.lineno, full
                else:
                    yield node.lineno, full if full in mods else root


def _imports() -> dict[tuple[str, str], list[str]]:
    """(importer subpackage, imported subpackage or third-party root) -> ["file:line", ...]."""
    arrows: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    mods = _modules()
    for mod, path in mods.items():
        here = _sub(mod)
        rel = path.relative_to(PKG.parent)
        for line, t in _import_targets(mod, path, mods):
            if t.startswith("cupid_engine."):
                if _sub(t) != here:
                    arrows[(here, _sub(t))].append(f"{rel}:{line}")
            elif t.split(".")[0] in THIRD_PARTY:
                arrows[(here, t.split(".")[0])].append(f"{rel}:{line}")
    return arrows


def _allowed(a: str, b: str) -> bool:
    if b in THIRD_PARTY:
        return a in THIRD_PARTY[b]
    fa, fb = _floor(a), _floor(b)
    if fa == fb:
        return SIDEWAYS.get((a, b), False)
    return fb < fa


def test_no_import_runs_upward():
    arrows = _imports()
    bad = {k: v for k, v in arrows.items() if not _allowed(*k) and k not in EXCEPTIONS}
    assert not bad, "imports that run upward or sideways:\n" + "\n".join(
        f"  {a} -> {b}: {', '.join(where[:5])}" for (a, b), where in sorted(bad.items()))


def test_exceptions_are_still_needed():
    arrows = _imports()
    gone = [k for k in EXCEPTIONS if k not in arrows]
    assert not gone, f"these exceptions no longer occur; remove them from EXCEPTIONS: {gone}"


def test_every_subpackage_has_a_floor():
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    subs |= {p.stem for p in PKG.glob("*.py")}
    for s in subs:
        _floor(s)


def _file_graph() -> dict[str, set[str]]:
    """Module -> modules of the package it imports (any depth)."""
    mods = _modules()
    return {m: {t for _, t in _import_targets(m, p, mods) if t in mods and t != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# Today's file-level circles and the issue item that removes each.
CIRCLE_EXCEPTIONS: dict[tuple[str, ...], str] = {}


def test_file_level_circles():
    found = {tuple(c) for c in _cycles(_file_graph())}
    new = sorted(found - set(CIRCLE_EXCEPTIONS))
    assert not new, "import circles between files:\n" + "\n".join("  " + " <-> ".join(c) for c in new)
    gone = sorted(set(CIRCLE_EXCEPTIONS) - found)
    assert not gone, f"these circles are gone; remove them from CIRCLE_EXCEPTIONS: {gone}"
