"""A vmap sweep interrupted after some variants saved their final checkpoints (issue 25 item
13): the rerun trains the unfinished variant in the same K-variant program as the interrupted
sweep (the finished ones with it, not rewritten), so it ends bitwise where an uninterrupted
sweep ends, whatever the point of interruption."""

import os
import shutil

import jax
import numpy as np
import pytest
import yaml

from rsa_jax.data import write_toy_data
from rsa_jax.sweep import load_sweep, run_sweep
from rsa_jax.training import Checkpoints, load_adapters

# Two vmap sweeps (one interrupted, one not) of the tiny model: about a minute on 2 cores.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _params(run_dir):
    _, params = load_adapters(run_dir)
    return {k: np.asarray(jax.device_get(v)) for k, v in params.items()}


def _steps(run_dir):
    ckpt = Checkpoints(run_dir, async_save=False, read_only=True)
    try:
        return ckpt.manager.all_steps()
    finally:
        ckpt.close()


def test_an_interrupted_vmap_sweep_finishes_bitwise_as_an_uninterrupted_one(tmp_path, capsys):
    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=32)
    doc = {
        "base": TINY,
        "mode": "vmap",
        "run_dir": str(tmp_path / "runs"),
        "overrides": [
            f"data.path={data}",
            "train.progress_bar=false",
            "checkpoint.every=0",
            "stages.0.view=safety",
            "stages.0.steps=2",
            "stages.1.steps=2",
            "optim.learning_rate=3e-3",
        ],
        "grid": {"stages.1.beta": [0.1, 0.05, 0.02]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    sweep = load_sweep(str(path))
    assert [r["status"] for r in run_sweep(sweep)["variants"]] == ["done"] * 3
    last = sweep.variants[-1].run_dir
    uninterrupted = _params(last)
    kept = {v.name: _steps(v.run_dir) for v in sweep.variants[:-1]}

    shutil.rmtree(last)  # interrupted before the last variant's final checkpoint was written
    capsys.readouterr()
    statuses = [r["status"] for r in run_sweep(sweep)["variants"]]
    assert statuses == ["skipped", "skipped", "done"]
    assert "trained in one program with the 2 finished one(s)" in capsys.readouterr().out
    resumed = _params(last)
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:
        np.testing.assert_array_equal(resumed[k], uninterrupted[k], err_msg=k)
    assert {v.name: _steps(v.run_dir) for v in sweep.variants[:-1]} == kept  # not rewritten
