"""Each subpackage exports what other packages or users need, and nothing else.

Read from the source with `ast` (nothing is imported). For every subpackage `rsa_jax.<sub>`
(`testing` excluded: it is a tool for tests), each name in its `__init__.py`'s `__all__` must be

(a) used through the public package by a module of another unit under `rsa_jax/` (another
    subpackage, a top-level module such as `cli.py`, or the package `rsa_jax` itself, whose lazy
    `_EXPORTS` dict names the package it serves each name from): `from rsa_jax.<sub> import NAME`,
    or `ALIAS.NAME` where `ALIAS` is bound to `rsa_jax.<sub>`; or
(b) documented for users in `docs/api.md`, in a table under the heading `## rsa_jax.<sub>`.

Everything else is plumbing: it lives in its private module, and tests and benches import it from
there. The docs page may list only names that are really exported, and every `__all__` entry must
exist in the `__init__` (imported, defined, or served lazily from a `_LAZY`-style dict).
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOT = REPO / "rsa_jax"
API_DOC = REPO / "docs" / "api.md"
SUBPACKAGES = (
    "compile",
    "data",
    "eval",
    "generate",
    "losses",
    "models",
    "sweep",
    "tasks",
    "training",
)


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit_of(module: str) -> str:
    """`rsa_jax.training._step` -> `rsa_jax.training`; `rsa_jax.cli` -> itself; `rsa_jax`."""
    return ".".join(module.split(".")[:2])


def _dict_literal(tree: ast.Module, name: str) -> dict[str, str] | None:
    """The string-to-string dict literal assigned to `name` at module level, if there is one."""
    for node in tree.body:
        value = None
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            value = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id == name:
                value = node.value
        if isinstance(value, ast.Dict):
            return {
                k.value: v.value
                for k, v in zip(value.keys, value.values, strict=True)
                if isinstance(k, ast.Constant)
                and isinstance(k.value, str)
                and isinstance(v, ast.Constant)
                and isinstance(v.value, str)
            }
    return None


def exported(init: pathlib.Path) -> list[str]:
    """The names in `__all__` of the module at `init`: string literals, and `*NAME` where NAME is
    a module-level dict literal (its keys)."""
    tree = ast.parse(init.read_text(encoding="utf-8"), filename=str(init))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            if not isinstance(node.value, ast.List | ast.Tuple):
                raise AssertionError(f"{init}: __all__ is not a list literal")
            names: list[str] = []
            for element in node.value.elts:
                if isinstance(element, ast.Constant) and isinstance(element.value, str):
                    names.append(element.value)
                elif isinstance(element, ast.Starred) and isinstance(element.value, ast.Name):
                    lazy = _dict_literal(tree, element.value.id)
                    if lazy is None:
                        raise AssertionError(
                            f"{init}: __all__ unpacks {element.value.id}, not a dict literal"
                        )
                    names.extend(lazy)
                else:
                    raise AssertionError(f"{init}:{element.lineno}: __all__ entry not a string")
            return names
    raise AssertionError(f"{init}: no __all__")


def defined(init: pathlib.Path) -> set[str]:
    """The names the module at `init` binds at module level (imports, definitions, assignments,
    imports under `if TYPE_CHECKING:` included), plus the keys of its dict literals of name ->
    module string that a module `__getattr__` serves lazily."""
    tree = ast.parse(init.read_text(encoding="utf-8"), filename=str(init))
    names: set[str] = set()

    def bind(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    names.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.If | ast.Try):
                bind(node.body)
                bind(node.orelse)

    bind(tree.body)
    has_getattr = any(
        isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in tree.body
    )
    if has_getattr:
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name):
                    lazy = _dict_literal(tree, target.id) or {}
                    names.update(k for k, v in lazy.items() if v.startswith("rsa_jax"))
    return names


def public_uses(root: pathlib.Path) -> dict[str, dict[str, set[str]]]:
    """uses[package][name] = the units other than `package`'s own that use `package.name`.

    Counted: `from rsa_jax.<sub> import NAME` (absolute), `ALIAS.NAME` where ALIAS was bound in
    the same file by `import rsa_jax.<sub> as ALIAS` or `from rsa_jax import <sub> [as ALIAS]`,
    and the package `rsa_jax`'s lazy `_EXPORTS` dict (`"NAME": "rsa_jax.<sub>"`).
    """
    packages = {f"{root.name}.{sub}" for sub in SUBPACKAGES}
    uses: dict[str, dict[str, set[str]]] = {p: {} for p in packages}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        unit = _unit_of(module)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module in packages:
                    for alias in node.names:
                        uses[node.module].setdefault(alias.name, set()).add(unit)
                elif node.module == root.name:
                    for alias in node.names:
                        package = f"{root.name}.{alias.name}"
                        if package in packages:
                            aliases[alias.asname or alias.name] = package
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in packages and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                uses[aliases[node.value.id]].setdefault(node.attr, set()).add(unit)
        if module == root.name:
            for name, target in (_dict_literal(tree, "_EXPORTS") or {}).items():
                if target in packages:
                    uses[target].setdefault(name, set()).add(unit)
    for package, names in uses.items():
        for users in names.values():
            users.discard(package)
    return uses


def documented(text: str) -> dict[str, list[str]]:
    """docs[package] = the names in the first column of the tables under `## rsa_jax.<sub>`
    headings (a name in backticks, optionally a call `name(...)`)."""
    docs: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        heading = re.match(r"##\s+`?(rsa_jax\.\w+)`?\s*$", line)
        if heading:
            current = heading.group(1)
            docs.setdefault(current, [])
            continue
        if line.startswith("#"):
            current = None
            continue
        cell = re.match(r"\|\s*`([A-Za-z_]\w*)", line)
        if current and cell:
            docs[current].append(cell.group(1))
    return docs


def api_problems(root: pathlib.Path, doc_text: str, subpackages=SUBPACKAGES) -> list[str]:
    """Every exported name that is neither used by another unit nor documented, and every
    documented name that is not exported, one line per package."""
    uses = public_uses(root)
    docs = documented(doc_text)
    problems = []
    for sub in subpackages:
        package = f"{root.name}.{sub}"
        names = exported(root / sub / "__init__.py")
        listed = docs.get(package, [])
        unused = sorted({n for n in names if not uses[package].get(n) and n not in listed})
        if unused:
            problems.append(
                f"{package} exports names no other unit imports and docs/api.md does not "
                f"list (document them or make them private): {', '.join(unused)}"
            )
        stale = sorted(set(listed) - set(names))
        if stale:
            problems.append(f"docs/api.md lists names {package} does not export: {stale}")
        doubled = sorted({n for n in listed if listed.count(n) > 1})
        if doubled:
            problems.append(f"docs/api.md lists names of {package} twice: {doubled}")
    for package in sorted(set(docs) - {f"{root.name}.{s}" for s in subpackages}):
        problems.append(f"docs/api.md has a section for {package}, which is not checked")
    return problems


# --- the checker on a small made-up package ------------------------------------------------------


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


@pytest.fixture
def toy(tmp_path):
    root = tmp_path / "rsa_jax"
    _write(
        root,
        {
            "__init__.py": '_EXPORTS = {"fit": "rsa_jax.training"}\n',
            "training/__init__.py": (
                "from rsa_jax.training._a import fit, helper, internal, documented_one\n"
                "_LAZY = {'lazy': 'rsa_jax.training._b'}\n"
                "def __getattr__(name): ...\n"
                "__all__ = [*_LAZY, 'fit', 'helper', 'internal', 'documented_one']\n"
            ),
            "training/_a.py": "from rsa_jax.training import internal\n",
            "eval/__init__.py": "__all__ = ['score']\nfrom rsa_jax.eval.m import score\n",
            "eval/m.py": (
                "from rsa_jax.training import helper\n"
                "from rsa_jax import training as tr\n"
                "x = tr.lazy\n"
                "def score(): ...\n"
            ),
            "cli.py": "import rsa_jax.eval as ev\nev.score()\n",
        },
    )
    return root


def test_exported_and_defined_read_lazy_dicts(toy):
    init = toy / "training" / "__init__.py"
    assert exported(init) == ["lazy", "fit", "helper", "internal", "documented_one"]
    assert {"lazy", "fit", "helper", "internal", "documented_one"} <= defined(init)
    assert "nothing" not in defined(init)


def test_public_uses_counts_other_units_only(toy):
    uses = public_uses(toy)
    training = uses["rsa_jax.training"]
    assert training["helper"] == {"rsa_jax.eval"}
    assert training["lazy"] == {"rsa_jax.eval"}  # through the alias `tr`
    assert training["fit"] == {"rsa_jax"}  # through the package's _EXPORTS
    assert training["internal"] == set()  # its own package does not count
    assert uses["rsa_jax.eval"]["score"] == {"rsa_jax.cli"}


def test_api_problems_names_package_and_names(toy):
    doc = "# API\n\n## rsa_jax.training\n\n| name | what |\n|---|---|\n| `gone` | x |\n"
    problems = api_problems(toy, doc, subpackages=("training", "eval"))
    assert problems == [
        "rsa_jax.training exports names no other unit imports and docs/api.md does not list "
        "(document them or make them private): documented_one, internal",
        "docs/api.md lists names rsa_jax.training does not export: ['gone']",
    ]
    doc = "## rsa_jax.training\n\n| `documented_one(x)` | y |\n| `internal` | z |\n"
    assert api_problems(toy, doc, subpackages=("training", "eval")) == []


# --- the real package ----------------------------------------------------------------------------


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_every_export_exists(sub):
    init = ROOT / sub / "__init__.py"
    names = exported(init)
    missing = sorted(set(names) - defined(init))
    assert not missing, f"rsa_jax.{sub}.__all__ names what its __init__ does not bind: {missing}"
    doubled = sorted({n for n in names if names.count(n) > 1})
    assert not doubled, f"rsa_jax.{sub}.__all__ lists names twice: {doubled}"


def test_every_export_is_used_elsewhere_or_documented():
    problems = api_problems(ROOT, API_DOC.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)
