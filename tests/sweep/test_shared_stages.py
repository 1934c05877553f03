"""vmap sweeps train the stages all variants share once, un-vmapped, and vmap from the first stage
where they differ (`rsa_jax.sweep._vmap.shared_stages`): the same losses, stage policies and final
parameters as running every variant through the trainer, and the stage-1 policy kept in each
variant's `stages/0` for RSA(P) merges."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from flax import nnx

from rsa_jax.data import write_toy_data
from rsa_jax.eval import load_model
from rsa_jax.sweep import load_sweep, run_sweep
from rsa_jax.sweep._vmap import shared_stages
from rsa_jax.training import list_candidates, load_policy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _sweep_file(directory, **doc) -> str:
    path = str(directory / "sweep.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"base": TINY, "run_dir": str(directory / "runs"), **doc}, f)
    return path


# ---------------------------------------------------------------- which stages are shared


@pytest.mark.parametrize(
    ("grid", "shared"),
    [
        ({"stages.1.beta": [0.1, 0.05, 0.01]}, 1),  # only stage 2 differs: stage 1 shared
        ({"stages.0.beta": [0.1, 0.05]}, 0),  # stage 1 differs: nothing shared
        ({"stages.1.beta": [0.1, 0.05], "stages.0.mu": [0.95, 0.5]}, 0),
        ({"stages.1.beta": [0.1, 0.05], "optim.learning_rate": [1.0e-3, 1.0e-4]}, 0),  # optim
        ({"stages.1.steps": [2, 3]}, 1),
        ({"train.progress_bar": [False, True]}, 1),  # identical stages: the last is never shared
    ],
)
def test_shared_stages_is_the_prefix_where_every_variant_agrees(tmp_path, grid, shared):
    sweep = load_sweep(_sweep_file(tmp_path, grid=grid))
    assert shared_stages(list(sweep.variants)) == shared


def test_one_variant_shares_every_stage_but_the_last(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, grid={"stages.1.beta": [0.05]}))
    assert shared_stages(list(sweep.variants)) == 1


# ---------------------------------------------------------------- shared prefix == trainer


def _losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[(r["stage"], r["step"])] = r["loss"]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same three-variant beta_2 sweep run by the trainer (sequential) and as a vmap sweep.

    Stage 2 uses ERM and Adam's eps is 1e-6 for the reasons in tests/sweep/test_sweep.py
    (`_run_sweep_file`): the vmapped and the trainer's programs sum in different orders, so
    stage 2 agrees to rounding, and those two choices keep rounding from being amplified."""
    return _sequential_and_vmap(tmp_path_factory.mktemp("shared"), [0.1, 0.05, 0.01])


def _sequential_and_vmap(directory, betas, *overrides):
    """A beta_2 sweep file (stage 1: 3 DPO steps; stage 2: 2 ERM steps, Adam's eps 1e-6), run
    sequentially here; returns that sweep and the same file loaded in vmap mode (not run)."""
    data = str(directory / "pairs.jsonl")
    write_toy_data(data, rows=32)
    doc = dict(
        overrides=[
            f"data.path={data}",
            "checkpoint.every=0",
            "checkpoint.candidates_every=2",
            "stages.0.steps=3",
            "stages.1.steps=2",
            "stages.1.risk=erm",
            "stages.1.mu=0.5",
            "optim.eps=1.0e-6",
            *overrides,
        ],
        grid={"stages.1.beta": betas},
    )
    path = _sweep_file(directory, **doc)
    sequential = load_sweep(path, mode="sequential", run_dir=str(directory / "seq"))
    run_sweep(sequential)
    return sequential, load_sweep(path, mode="vmap", run_dir=str(directory / "vmap"))


def _assert_final_policies_close(a, b):
    """The final policies of two runs of one variant agree within 1e-5 in every parameter."""
    pa, pb = load_policy(a.run_dir)[1], load_policy(b.run_dir)[1]
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(
            np.asarray(pb[k]), np.asarray(pa[k]), rtol=0, atol=1e-5, err_msg=f"{a.name} {k}"
        )


@pytest.mark.slow  # the module's runs: a vmap and a sequential sweep (over a minute)
def test_shared_stage_trains_once_and_vmap_equals_sequential_runs(runs, capsys):
    sequential, vmap = runs
    capsys.readouterr()
    results = run_sweep(vmap)
    printed = capsys.readouterr().out
    assert [r["status"] for r in results["variants"]] == ["done"] * 3
    assert printed.count("is the same in all 3 variant(s): trained once") == 1
    for a, b in zip(sequential.variants, vmap.variants, strict=True):
        assert a.name == b.name
        seq, vm = _losses(a.run_dir), _losses(b.run_dir)
        assert seq.keys() == vm.keys() and len(seq) == 5
        for key in seq:
            if key[0] == 0:  # the shared stage runs the trainer's own compiled step
                assert vm[key] == seq[key], (a.name, key)
            else:
                assert vm[key] == pytest.approx(seq[key], abs=1e-5), (a.name, key)
        # Stage 1's policy, kept for RSA(P) (`RUN@0`): bitwise the trainer's.
        p0a, p0b = load_policy(a.run_dir, stage=0)[1], load_policy(b.run_dir, stage=0)[1]
        for k in p0a:
            np.testing.assert_array_equal(np.asarray(p0b[k]), np.asarray(p0a[k]), err_msg=k)
        _assert_final_policies_close(a, b)
    # The variants did train apart in stage 2 (different betas, different final losses).
    finals = {v.name: _losses(v.run_dir)[(1, 2)] for v in vmap.variants}
    assert len({round(x, 7) for x in finals.values()}) == 3, finals


@pytest.mark.slow  # the module's runs: a vmap and a sequential sweep (over a minute)
def test_sequential_sweep_trains_a_shared_stage_once(runs):
    """Issue 25, item 6: the first variant trains stage 0; the others start stage 1 from its
    stage-0 policy (their own checkpoints begin after stage 0) with its records and policy
    copied; the vmap comparison above shows the result is what training them gives."""
    sequential, _ = runs
    first, *others = sequential.variants
    steps = {v.name: sorted(os.listdir(os.path.join(v.run_dir, "checkpoints"))) for v in others}
    assert sorted(os.listdir(os.path.join(first.run_dir, "checkpoints"))) == ["3", "5"]
    assert all(s == ["5"] for s in steps.values()), steps  # no stage-0 checkpoint: not trained
    p0 = load_policy(first.run_dir, stage=0)[1]
    for v in others:
        assert {k: x for k, x in _losses(v.run_dir).items() if k[0] == 0} == {
            k: x for k, x in _losses(first.run_dir).items() if k[0] == 0
        }
        p0v = load_policy(v.run_dir, stage=0)[1]
        for k in p0:
            np.testing.assert_array_equal(np.asarray(p0v[k]), np.asarray(p0[k]), err_msg=k)


@pytest.mark.slow  # two LoRA sweeps; the full-model case above runs by default
def test_lora_shared_stage_vmap_equals_sequential_runs(tmp_path):
    """With LoRA the shared stage-1 adapters are stage 2's one reference (the frozen nf4 base
    shared as always): the same losses and merged final policies as the trainer."""
    sequential, vmap = _sequential_and_vmap(
        tmp_path,
        [0.1, 0.02],
        "optim.learning_rate=3e-3",
        "model.lora.rank=4",
        "model.lora.base_storage=nf4",
        "model.lora.block_size=16",
    )
    assert shared_stages(list(vmap.variants)) == 1
    assert [r["status"] for r in run_sweep(vmap)["variants"]] == ["done"] * 2
    for a, b in zip(sequential.variants, vmap.variants, strict=True):
        seq, vm = _losses(a.run_dir), _losses(b.run_dir)
        assert seq.keys() == vm.keys() and len(seq) == 5
        for key in seq:
            assert vm[key] == pytest.approx(seq[key], abs=1e-5), (a.name, key)
        _assert_final_policies_close(a, b)


@pytest.mark.slow  # the module's runs: a vmap and a sequential sweep (over a minute)
def test_points_along_training_are_kept_alike_by_the_trainer_and_the_vmap(runs):
    """`checkpoint.candidates_every=2`: stage 1 (3 steps) keeps step 2, stage 2 (2 steps)
    keeps nothing (its end is the final policy). The shared stage's point is the trainer's
    bitwise, it lies between the initial and the stage-1 policy, and `RUN@STAGE:STEP` loads."""
    sequential, vmap = runs
    run_sweep(vmap)  # skips variants another test finished
    for a, b in zip(sequential.variants, vmap.variants, strict=True):
        assert list_candidates(a.run_dir) == list_candidates(b.run_dir) == [(0, 2)]
        pa = load_policy(a.run_dir, stage="0:2")[1]
        pb = load_policy(b.run_dir, stage="helpfulness:2")[1]
        end = load_policy(a.run_dir, stage=0)[1]
        for k in pa:
            np.testing.assert_array_equal(np.asarray(pb[k]), np.asarray(pa[k]), err_msg=k)
        assert any(not np.array_equal(pa[k], end[k]) for k in pa)  # one step before the end
        model, _ = load_model(f"{b.run_dir}@0:2")  # what the demo evaluates
        loaded = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model))}
        for k in pa:
            np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(pa[k]), err_msg=k)
    missing = r"no candidate at stage 1 step 1 .*kept: \['0:2'\]"
    with pytest.raises(FileNotFoundError, match=missing):
        load_policy(sequential.variants[0].run_dir, stage="1:1")
