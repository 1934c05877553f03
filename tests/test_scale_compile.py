"""The scale recipes compiled for their TPU slices (slow: minutes each, 70B programs more; needs
libtpu): every program fits, and its per-chip memory is what docs/scale.json (the table of
docs/scale.md) says, so the table is the compiler's and not a stale copy."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu"),
]


def _table_module():
    path = os.path.join(ROOT, "bench", "scale_table.py")
    spec = importlib.util.spec_from_file_location("scale_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TABLE = _table_module()


@pytest.mark.parametrize("name", [r.name for r in TABLE.RECIPES])
def test_recipe_fits_and_matches_the_table(name):
    recorded = TABLE.load().get(name)
    if recorded is None:
        pytest.skip(f"{name}: not in docs/scale.json yet (python bench/scale_table.py --recipe)")
    measured = TABLE.measure(TABLE.BY_NAME[name])
    assert [p["name"] for p in measured["programs"]] == [p["name"] for p in recorded["programs"]]
    for now, then in zip(measured["programs"], recorded["programs"], strict=True):
        assert now["fits"], now
        assert now["per_chip_gib"] == pytest.approx(then["per_chip_gib"], rel=1e-6), now["name"]
        assert now["flops"] == pytest.approx(then["flops"], rel=1e-9), now["name"]
