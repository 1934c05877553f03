"""An adapter sweep: vmap mode with LoRA on trains K variants on one frozen (nf4) base, passed
once, to the same losses and adapters as K sequential LoRA runs (tolerances of the full-model
vmap test in test_sweep.py, for the same reasons: the programs sum in different orders)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import yaml

from rsa_jax.data import write_toy_data
from rsa_jax.sweep import load_sweep, run_sweep
from rsa_jax.training import load_adapters

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[(r["stage"], r["step"])] = r["loss"]
    return out


@pytest.mark.slow  # two LoRA sweeps (over a minute); test_sweep.py runs the full-model one
def test_adapter_sweep_vmap_equals_sequential_lora_runs(tmp_path):
    data_path = str(tmp_path / "pairs.jsonl")
    write_toy_data(data_path, rows=32)
    shared = [
        f"data.path={data_path}",
        "checkpoint.every=0",
        "stages.0.view=safety",
        "stages.0.steps=3",
        "stages.1.steps=2",
        "stages.1.risk=erm",  # see test_sweep._run_sweep_file
        "stages.1.mu=0.5",
        "optim.eps=1.0e-6",
        "optim.learning_rate=3e-3",
        "model.lora.rank=4",
        "model.lora.base_storage=nf4",
        "model.lora.block_size=16",
    ]
    doc = {
        "base": TINY,
        "overrides": shared,
        "run_dir": str(tmp_path / "runs"),
        "variants": [
            {"name": "a"},
            {"name": "b", "overrides": ["stages.0.beta=0.05", "optim.weight_decay=0.1"]},
        ],
    }
    path = str(tmp_path / "sweep.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)

    seq = load_sweep(path)
    assert all(r["status"] == "done" for r in run_sweep(seq)["variants"])
    vm = load_sweep(path, mode="vmap", run_dir=str(tmp_path / "vmap"))
    assert [r["status"] for r in run_sweep(vm)["variants"]] == ["done"] * 2

    finals = []
    for a, b in zip(seq.variants, vm.variants, strict=True):
        seq_losses, vmap_losses = _losses(a.run_dir), _losses(b.run_dir)
        assert seq_losses.keys() == vmap_losses.keys() and len(seq_losses) == 5
        for key in seq_losses:
            assert vmap_losses[key] == pytest.approx(seq_losses[key], abs=1e-5), (a.name, key)
        engine, pa = load_adapters(a.run_dir)
        _, pb = load_adapters(b.run_dir)
        assert pa.keys() == pb.keys() and all(k.endswith(("_lora_a", "_lora_b")) for k in pa)
        for k in pa:
            np.testing.assert_allclose(
                np.asarray(pb[k]), np.asarray(pa[k]), rtol=0, atol=1e-5, err_msg=f"{a.name} {k}"
            )
        finals.append(np.concatenate([np.ravel(np.asarray(v)) for v in pa.values()]))
    # The variants really differ (their own hyperparameters), so the comparison is not vacuous.
    assert min(np.abs(finals[i] - finals[j]).max() for i in range(2) for j in range(i)) > 1e-4
    # Every variant's checkpoint holds adapters only: no base, no second model.
    assert not any(isinstance(x, jax.Array) and x.size > 10**6 for x in jax.tree.leaves(pa))
