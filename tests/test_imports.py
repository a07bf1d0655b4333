"""The package's shape: no import cycle among ``nirvana/`` modules, and no module importing another's private names.

Read from the source with ``ast`` (imports inside functions count too), so the check needs nothing imported.
A package's ``__init__`` re-exports its modules, so edges into and out of an ``__init__`` are not cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nirvana"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """Each module's nirvana imports, and every ``from X import _name`` of a private name of another module."""
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges[module] |= {a.name for a in node.names if a.name in mods and a.name != module}
            elif isinstance(node, ast.ImportFrom):
                target = _target(module, path, node)
                if target.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    dep = submodule if submodule in mods else target
                    if dep in mods and dep != module:
                        edges[module].add(dep)
                    if submodule not in mods and alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{module} imports {target}.{alias.name}")
    return edges, private


def cycles(edges: dict[str, set[str]], skip: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), leaving out the ``skip`` nodes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        index[u] = low[u] = len(index)
        stack.append(u)
        for v in sorted(edges[u] - skip):
            if v not in index:
                visit(v)
                low[u] = min(low[u], low[v])
            elif v in stack:
                low[u] = min(low[u], index[v])
        if low[u] == index[u]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == u:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for u in sorted(set(edges) - skip):
        if u not in index:
            visit(u)
    return found


def test_no_import_cycle():
    edges, _ = import_graph()
    packages = {m for m, p in modules().items() if p.name == "__init__.py"}
    assert cycles(edges, packages) == []


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert private == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """Both checks find a planted cycle and a planted private import, so an empty answer means something."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import run\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import _private_module\nfrom .b import _helper\n")
    (pkg / "b.py").write_text("def _helper(): pass\ndef f():\n    from .sub.c import g\n")
    (pkg / "sub" / "c.py").write_text("from ..a import run\n")
    (pkg / "_private_module.py").write_text("")
    edges, private = import_graph(tmp_path)
    packages = {m for m, p in modules(tmp_path).items() if p.name == "__init__.py"}
    assert cycles(edges, packages) == [["nirvana.a", "nirvana.b", "nirvana.sub.c"]]
    assert private == ["nirvana.a imports nirvana.b._helper"]  # a private module is fine, a private name is not
    assert cycles({"a": {"b"}, "b": {"a"}}, {"b"}) == []
