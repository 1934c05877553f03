"""Where evaluation runs: mesh text, placements, and `rsa-jax eval` of a trained run directory
(its parameters loaded onto its training mesh, or all devices on `data` when that mesh does not
fit the devices here)."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
import pytest
from flax import nnx

import rsa_jax.training as training
from rsa_jax.cli import main
from rsa_jax.config import MeshConfig
from rsa_jax.data import write_toy_data
from rsa_jax.eval import load_model, mesh_from_text, placement_for, placement_of, read_samples
from rsa_jax.models import Llama, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def test_mesh_from_text():
    assert mesh_from_text("-1,2,1") == MeshConfig(data=-1, fsdp=2, tensor=1)
    assert mesh_from_text(" 2, 2 ,2") == MeshConfig(data=2, fsdp=2, tensor=2)
    for bad in ("2,2", "a,1,1", "-1,-1,1", "0,1,1", "-2,1,1"):
        with pytest.raises(ValueError, match=f"mesh '{bad}': give DATA,FSDP,TENSOR"):
            mesh_from_text(bad)


def test_one_device_evaluates_unsharded():
    placement = placement_for(MeshConfig(data=-1), jax.devices()[:1])
    assert placement.row_shards == 1 and placement.batch_axes == ()
    assert placement_of(Llama(tiny_config(), rngs=nnx.Rngs(0))) is None


def test_load_model_names_a_path_that_is_neither(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        load_model(str(tmp_path))


def _params(model):
    return {
        "/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))
    }


SCORER = """
import numpy as np

def score(prompts, responses):
    n = np.array([float(len(r)) for r in responses])
    return {"reward": n, "cost": -n, "catastrophic": n > 1e9}
"""


@pytest.mark.slow  # trains a run and evaluates it on two meshes (about 30 s on 2 cores)
def test_eval_of_a_run_directory_on_its_mesh_or_a_fallback(tmp_path, caplog, monkeypatch):
    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=16)
    run = str(tmp_path / "run")
    overrides = [f"data.path={data}", f"train.run_dir={run}", "stages.0.steps=2"]
    overrides += ["stages.1.steps=1", "checkpoint.async_save=false"]
    assert main(["train", TINY, *overrides]) == 0
    model, tokenizer = load_model(run)
    # The training mesh asks for 2 fsdp devices, which one device cannot give: a warning, and
    # all devices on data, with the same parameters. (The run's config is its checkpoint's,
    # which a test cannot edit: the config the run reports is replaced instead.)
    trained = training.run_config(run)
    wide = dataclasses.replace(trained, mesh=dataclasses.replace(trained.mesh, fsdp=2))
    monkeypatch.setattr(training, "run_config", lambda path: wide)
    with caplog.at_level(logging.WARNING):
        fallback, _ = load_model(run)
    assert "does not fit the 1 devices here" in caplog.text
    want, got = _params(model), _params(fallback)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    # `rsa-jax eval RUN` samples from it and writes its texts.
    (tmp_path / "prompts.txt").write_text("hello there\nwhat is safe\n")
    (tmp_path / "length_scorer_mod.py").write_text(SCORER)
    monkeypatch.chdir(tmp_path)
    command = ["eval", run, "--scorer", "length_scorer_mod:score", "--prompts", "prompts.txt"]
    command += ["--samples", "2"]
    assert main([*command, "--max-new-tokens", "3", "--n-boot", "10", "--out", "out"]) == 0
    rows = read_samples(tmp_path / "out")
    assert [(r["model"], r["prompt"], r["sample"]) for r in rows] == [
        ("run", p, i) for p in ("hello there", "what is safe") for i in range(2)
    ]
    assert [r["reward"] for r in rows] == [float(len(r["text"])) for r in rows]
    assert len(tokenizer) > 0


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--mesh", "2,x,1"], "eval --mesh: mesh '2,x,1': give DATA,FSDP,TENSOR"),
        (["--memory-gb", "0"], "eval --memory-gb: must be > 0, got 0.0"),
    ],
)
def test_eval_rejects_a_bad_mesh_or_budget_with_one_line(tmp_path, flag, message):
    (tmp_path / "p.txt").write_text("hi\n")
    args = ["eval", str(tmp_path), "--task", "safety", "--prompts", str(tmp_path / "p.txt")]
    with pytest.raises(SystemExit, match=message):
        main([*args, *flag, "--out", str(tmp_path / "o")])
