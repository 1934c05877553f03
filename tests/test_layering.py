"""The package's layering, read from the source with `ast` (nothing is imported).

Three rules, each checked over every import statement under `rsa_jax/`, function-level imports
included:

(a) a private module (`_x`) is imported only from inside the package that holds it
    (`rsa_jax.training._step` from `rsa_jax.training._trainer` is fine, from `rsa_jax.sweep` or
    from the top-level `rsa_jax/cli.py` it is not);
(b) the graph of units (the subpackages `rsa_jax.<name>` and each top-level module such as
    `rsa_jax.cli`) built from those imports has no cycle;
(c) nothing outside `rsa_jax.testing` imports `rsa_jax.testing`;
(d) inside each subpackage, the graph of its modules (the package's `__init__` included) has no
    cycle either: a module that imports its own package's `__init__`, or two modules that import
    each other, make the import order decide what works.

The checker is tested on small made-up packages first, so that a pass on the real package means
something. Each failure message lists every violation with its file and line.
"""

from __future__ import annotations

import ast
import pathlib
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "rsa_jax"


class Import(NamedTuple):
    """One imported rsa_jax module: where the import statement is and what it names."""

    path: pathlib.Path  # the importing file
    line: int
    importer: str  # dotted module name of the importing file
    target: str  # dotted module name of the imported module


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    """`root/training/_step.py` -> `rsa_jax.training._step`; a package's `__init__.py` -> the
    package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(name: str, path: pathlib.Path) -> str:
    """The package that a relative import in module `name` (file `path`) is relative to."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def collect_imports(root: pathlib.Path) -> list[Import]:
    """Every import of a module of the package at `root`, in every file, at any depth.

    `from pkg import name` counts as an import of `pkg.name` when that is a module (a file or a
    subpackage), else of `pkg`. Relative imports are resolved against the importing package.
    One entry per (file, line, imported module), in file and line order.
    """
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    found: dict[Import, None] = {}  # ordered and without repeats (`from m import a, b`)
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = _package_of(importer, path).split(".")
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.append(candidate if candidate in modules else base)
            for target in targets:
                # `import rsa_jax.a.b` names the module rsa_jax.a.b (and loads its parents).
                while target and target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules:
                    found[Import(path, node.lineno, importer, target)] = None
    return sorted(found, key=lambda i: (i.path, i.line, i.target))


def unit_of(name: str) -> str:
    """The layering unit of a module: its subpackage `rsa_jax.<sub>`, or the top-level module
    itself (`rsa_jax.cli`, `rsa_jax.config`, the package `rsa_jax`)."""
    parts = name.split(".")
    return ".".join(parts[:2])


def private_owner(name: str) -> str | None:
    """The package a private module belongs to (the parent of its first `_x` component), or None
    for a public module. `rsa_jax.training._step` -> `rsa_jax.training`."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _where(imp: Import, root: pathlib.Path) -> str:
    return f"{imp.path.relative_to(root.parent)}:{imp.line}"


def private_import_violations(imports: list[Import], root: pathlib.Path) -> list[str]:
    """Rule (a): private modules imported from outside the package that holds them."""
    out = []
    for imp in imports:
        owner = private_owner(imp.target)
        if owner is None:
            continue
        inside = imp.importer == owner or imp.importer.startswith(owner + ".")
        if not inside:
            out.append(
                f"{_where(imp, root)}: {imp.importer} imports {imp.target}, private to {owner}"
            )
    return out


def unit_graph(imports: list[Import]) -> dict[str, dict[str, list[Import]]]:
    """edges[a][b] = the imports that make unit a depend on unit b (a != b)."""
    edges: dict[str, dict[str, list[Import]]] = {}
    for imp in imports:
        a, b = unit_of(imp.importer), unit_of(imp.target)
        if a != b:
            edges.setdefault(a, {}).setdefault(b, []).append(imp)
    return edges


def module_graph(imports: list[Import]) -> dict[str, dict[str, list[Import]]]:
    """edges[a][b] = the imports of module b by module a, both inside one unit (a != b)."""
    edges: dict[str, dict[str, list[Import]]] = {}
    for imp in imports:
        a, b = imp.importer, imp.target
        if a != b and unit_of(a) == unit_of(b):
            edges.setdefault(a, {}).setdefault(b, []).append(imp)
    return edges


def find_cycles(edges: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan), each sorted, and each
    turned into one concrete cycle through all of its units' shortest links."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
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
                components.append(sorted(component))

    nodes = sorted(set(edges) | {b for targets in edges.values() for b in targets})
    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(components)


def _path(edges, start: str, goal: str, allowed: set[str]) -> list[str]:
    """Shortest path start -> goal inside `allowed` (breadth first; exists within an SCC)."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges.get(v, {})):
                if w in allowed and w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
        if goal in previous:
            break
    path = [goal]
    while (step := previous[path[-1]]) is not None:
        path.append(step)
    return path[::-1]


def cycle_violations(imports: list[Import], root: pathlib.Path, graph=unit_graph) -> list[str]:
    """Rules (b) and (d): one message per cycle of `graph`'s nodes (units, or the modules inside
    one unit), with the import statements along one cycle."""
    edges = graph(imports)
    out = []
    for component in find_cycles(edges):
        allowed = set(component)
        start = component[0]
        # A cycle through `start`: its first step, then the shortest way back.
        first = min(w for w in edges[start] if w in allowed)
        cycle = [start, *_path(edges, first, start, allowed)]
        links = []
        for a, b in zip(cycle, cycle[1:], strict=False):
            links.append(f"{a} -> {b} (" + ", ".join(_where(i, root) for i in edges[a][b]) + ")")
        out.append(
            f"cycle {' -> '.join(cycle)} among {{{', '.join(component)}}}:\n    "
            + "\n    ".join(links)
        )
    return out


def uses_of_testing_package(imports: list[Import], root: pathlib.Path) -> list[str]:
    """Rule (c): the test-support package is imported only by itself (and the tests)."""
    testing = f"{root.name}.testing"
    out = []
    for imp in imports:
        uses_testing = imp.target == testing or imp.target.startswith(testing + ".")
        if uses_testing and unit_of(imp.importer) != testing:
            out.append(f"{_where(imp, root)}: {imp.importer} imports {imp.target}")
    return out


def _report(rule: str, violations: list[str]) -> str:
    return f"{len(violations)} violation(s) of: {rule}\n  " + "\n  ".join(violations)


# --------------------------------------------------------------------------- the checker itself


def _write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package = root / "pkg"
    for rel, text in files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package


FAKE = {
    "__init__.py": "",
    "cli.py": "import pkg.sweep\nfrom pkg.train._step import step, other\n",
    "train/__init__.py": "from pkg.train._loop import run\n",
    "train/_loop.py": "from . import _step\nfrom ._step import step\n",
    "train/_step.py": "def step():\n    from pkg.testing import helpers\n",
    "sweep/__init__.py": "from pkg.sweep._grid import grid\n",
    "sweep/_grid.py": (
        "import os\nfrom pkg.train import run\n\ndef grid():\n    from pkg.cli import main\n"
    ),
    "testing/__init__.py": "",
    "testing/helpers.py": "from pkg.train import _loop\n",
    "data/__init__.py": "from .._private import x\nfrom pkg.train import run\n",
    "_private.py": "x = 1\n",
}


def test_collect_imports_resolves_relative_function_level_and_submodule_imports(tmp_path):
    package = _write_package(tmp_path, FAKE)
    got = {(module_name(i.path, package), i.line, i.target) for i in collect_imports(package)}
    assert ("pkg.train._loop", 1, "pkg.train._step") in got  # from . import _step
    assert ("pkg.train._loop", 2, "pkg.train._step") in got  # from ._step import step
    assert ("pkg.train._step", 2, "pkg.testing.helpers") in got  # inside a function
    assert ("pkg.sweep._grid", 5, "pkg.cli") in got
    assert ("pkg.data", 1, "pkg._private") in got  # two dots: the parent package
    assert ("pkg.testing.helpers", 1, "pkg.train._loop") in got  # from pkg.train import _loop
    assert ("pkg.sweep._grid", 2, "pkg.train") in got  # `run` is a name, not a module
    assert not any(t == "os" for _, _, t in got)  # only the package's own modules


def test_private_imports_across_packages_are_reported_and_inside_ones_are_not(tmp_path):
    package = _write_package(tmp_path, FAKE)
    found = private_import_violations(collect_imports(package), package)
    # One entry for `from pkg.train._step import step, other`, not one per name.
    assert found == [
        "pkg/cli.py:2: pkg.cli imports pkg.train._step, private to pkg.train",
        "pkg/testing/helpers.py:1: pkg.testing.helpers imports pkg.train._loop, private to "
        "pkg.train",
    ]


def test_cycles_between_units_are_found_with_their_import_lines(tmp_path):
    package = _write_package(tmp_path, FAKE)
    imports = collect_imports(package)
    # pkg.cli -> pkg.sweep -> pkg.cli, and pkg.train -> pkg.testing -> pkg.train.
    assert find_cycles(unit_graph(imports)) == [
        ["pkg.cli", "pkg.sweep"],
        ["pkg.testing", "pkg.train"],
    ]
    messages = cycle_violations(imports, package)
    assert messages[0].startswith("cycle pkg.cli -> pkg.sweep -> pkg.cli")
    assert "pkg.cli -> pkg.sweep (pkg/cli.py:1)" in messages[0]
    assert "pkg.sweep -> pkg.cli (pkg/sweep/_grid.py:5)" in messages[0]
    assert "pkg.train -> pkg.testing (pkg/train/_step.py:2)" in messages[1]


def test_an_acyclic_graph_has_no_cycle(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "cli.py": "import pkg.a\nimport pkg.b\n",
            "a/__init__.py": "from pkg.b import f\n",
            "b/__init__.py": "def f():\n    from pkg.c import g\n",
            "c/__init__.py": "def g():\n    pass\n",
        },
    )
    assert cycle_violations(collect_imports(package), package) == []


def test_cycles_between_modules_of_one_package_are_found(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "from pkg.a._x import f\n",
            "a/_x.py": "def f():\n    from pkg.a._y import g\n",
            "a/_y.py": "from pkg.a import f\n",  # back through the package's __init__
            "b/__init__.py": "from pkg.b._p import h\n",
            "b/_p.py": "import pkg.a\n\ndef h():\n    pass\n",
        },
    )
    imports = collect_imports(package)
    assert find_cycles(module_graph(imports)) == [["pkg.a", "pkg.a._x", "pkg.a._y"]]
    (message,) = cycle_violations(imports, package, graph=module_graph)
    assert "pkg.a._y -> pkg.a (pkg/a/_y.py:1)" in message
    # Between units there is no cycle: pkg.b -> pkg.a only.
    assert cycle_violations(imports, package) == []


def test_testing_imported_from_outside_is_reported(tmp_path):
    package = _write_package(tmp_path, FAKE)
    found = uses_of_testing_package(collect_imports(package), package)
    assert found == ["pkg/train/_step.py:2: pkg.train._step imports pkg.testing.helpers"]


# --------------------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return collect_imports(ROOT)


def test_the_real_package_has_imports_to_check(imports):
    # Guards the rules below against passing on an empty scan.
    units = {unit_of(i.importer) for i in imports}
    assert {"rsa_jax.losses", "rsa_jax.training", "rsa_jax.cli"} <= units


def test_no_private_module_is_imported_from_another_package(imports):
    violations = private_import_violations(imports, ROOT)
    assert not violations, _report("(a) no cross-package import of a private module", violations)


def test_no_import_cycle_between_subpackages(imports):
    violations = cycle_violations(imports, ROOT)
    assert not violations, _report("(b) no import cycle between subpackages", violations)


def test_only_testing_imports_testing(imports):
    violations = uses_of_testing_package(imports, ROOT)
    assert not violations, _report("(c) the package does not import rsa_jax.testing", violations)


def test_no_import_cycle_between_modules_of_a_subpackage(imports):
    violations = cycle_violations(imports, ROOT, graph=module_graph)
    assert not violations, _report("(d) no import cycle between modules of a package", violations)
