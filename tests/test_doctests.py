"""Docstring examples run: every module of the package whose docstrings hold `>>>` examples."""

from __future__ import annotations

import doctest
import importlib
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOT = REPO / "rsa_jax"


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__main__.py" or ">>>" not in path.read_text(encoding="utf-8"):
            continue
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_the_package_has_examples_to_run():
    assert "rsa_jax" in MODULES and "rsa_jax.losses._head" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, monkeypatch):
    monkeypatch.chdir(REPO)  # examples name files as a user in the checkout would
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert result.attempted > 0, f"{name}: no example was run"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_the_package_exports_exactly_its_starting_names():
    import rsa_jax

    assert sorted(rsa_jax.__all__) == sorted(
        [*rsa_jax._EXPORTS, *rsa_jax._SUBPACKAGES, "__version__"]
    )
    for name in rsa_jax.__all__:
        assert getattr(rsa_jax, name) is not None, name
