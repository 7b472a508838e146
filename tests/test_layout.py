"""The house rules of the source tree (issue 14): no import cycle in ``mriadv/`` and ``study/``
(counting imports inside functions too: a cycle that only a deferred import breaks is still one),
no module much over 400 lines, no ``sys.path`` edits outside ``benchmarks/``, and ``docs/layout.md``'s
table names every module, benchmark and space."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mriadv", "study")
MAX_LINES = 420  # "no module over ~400 lines"


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from a.b import c`` counts as ``a.b.c``
    where that is a module, else as ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

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
                cycles.append(sorted(component))

    for m in graph:
        if m not in index:
            visit(m)
    # a package's __init__ re-exporting its modules is not a cycle with them
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not cycles, f"import cycles: {cycles}"


def test_modules_stay_small():
    too_long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_no_sys_path_edits_outside_benchmarks():
    offenders = [
        str(p.relative_to(REPO))
        for package in (*PACKAGES, "tests", "docs")
        for p in (REPO / package).rglob("*.py")
        if "sys.path.insert" in p.read_text() and p.name != "test_layout.py"
    ]
    assert not offenders, offenders


def test_the_layout_table_names_every_module_benchmark_and_space():
    """``docs/layout.md`` (the README's map of the tree) names every module of ``mriadv/`` and ``study/``,
    every benchmark and every search space, and every file it names in backticks exists: the table
    matches the code (issue 23)."""
    import re

    text = (REPO / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`([A-Za-z_0-9./]+)`", text))
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    files += sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.sh"))
    missing = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        if path.name == "__init__.py" or path.name.startswith("_"):
            continue
        if path.name not in named and rel not in named:
            missing.append(rel)
    missing += [
        f"search_spaces/{p.name}" for p in sorted((REPO / "search_spaces").glob("*.yaml")) if p.stem not in named
    ]
    assert not missing, f"docs/layout.md does not name: {missing}"
    # every module-like name it gives exists somewhere in the tree
    stale = [
        n
        for n in named
        if n.endswith((".py", ".sh"))
        and not (REPO / n).exists()
        and not any(p.name == Path(n).name for p in files + sorted((REPO / "docs").glob("*.py")))
    ]
    assert not stale, f"docs/layout.md names files that do not exist: {stale}"
