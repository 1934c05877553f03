"""The scale recipes (configs/scale/, configs/sweeps/llama3_8b_risks.yaml): each loads and
validates for the slice its header compiles it on, names its commands, and docs/scale.md's table
is what `bench/scale_table.py --render` writes from docs/scale.json. No compile here: the recipes'
compiles are slow (tests/test_scale_compile.py)."""

import importlib.util
import os
import re
import sys

import pytest

from rsa_jax.compile import tpu_slice
from rsa_jax.config import config_files, load_config, validate
from rsa_jax.sweep import load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = config_files(os.path.join(ROOT, "configs", "scale"))
SWEEP = os.path.join(ROOT, "configs", "sweeps", "llama3_8b_risks.yaml")
COMPILE = re.compile(
    r"rsa-jax compile (\S+) --topology (\S+)(?: --slices (\d+))?(?: --sweep (\d+))?"
    r"(?: --variant-devices (\d+))?"
)


def _table_module():
    path = os.path.join(ROOT, "bench", "scale_table.py")
    spec = importlib.util.spec_from_file_location("scale_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _header(path: str) -> str:
    with open(path) as f:
        lines = f.read().split("\n")
    return "\n".join(
        line for line in lines[: lines.index(next(x for x in lines if not x.startswith("#")))]
    )


def test_every_recipe_is_in_the_table_script():
    table = _table_module()
    configs = {os.path.join(ROOT, r.config) for r in table.RECIPES}
    assert set(SCALE) == configs


@pytest.mark.parametrize("path", SCALE, ids=os.path.basename)
def test_recipe_validates_on_its_slice_and_documents_itself(path):
    header = _header(path)
    assert "rsa-jax train" in header and "Expected runtime" in header
    assert "# Measured per chip" in header
    m = COMPILE.search(header)
    assert m, f"{path}: no `rsa-jax compile ... --topology` line in the header"
    config_path, topology, slices, sweep, variant_devices = m.groups()
    assert os.path.join(ROOT, config_path) == path
    config = load_config(path)
    slices = int(slices or 1)
    assert config.mesh.slices == slices
    devices = tpu_slice(topology).chips * slices // int(variant_devices or 1)
    validate(config, device_count=devices)


def test_risk_sweep_has_eight_vmapped_variants_of_one_kernel():
    sweep = load_sweep(SWEEP)
    assert sweep.mode == "vmap" and len(sweep.variants) == 8
    assert sweep.variant_devices == 4
    kernels = {tuple(s.kernel for s in v.config.stages) for v in sweep.variants}
    assert len(kernels) == 1  # one program: the variants differ in traced values only
    assert len({v.config.stages[1].mu for v in sweep.variants}) == 4
    header = _header(SWEEP)
    assert "--sweep 8 --variant-devices 4" in header and "rsa-jax sweep" in header


def test_doc_table_is_the_rendered_json():
    table = _table_module()
    with open(table.DOC) as f:
        doc = f.read()
    rendered = doc.split(table.BEGIN, 1)[1].split(table.END, 1)[0].strip()
    assert rendered == table.table(table.load()).strip()
    for recipe in table.RECIPES:
        for path in (recipe.config, *recipe.headers):
            expected = table._wrap_comment(table.header_line(table.load().get(recipe.name)))
            assert "\n".join(expected) in _header(os.path.join(ROOT, path)), path
