"""A tiny two-stage run: loss goes down, the stage-2 reference is the stage-1 policy, the step
compiles once, and a run killed with SIGKILL then resumed equals the uninterrupted one bitwise
(full fine-tuning, and QLoRA with and without adapter dropout)."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rsa_jax.config import load_config
from rsa_jax.data import write_toy_data
from rsa_jax.training import EXIT_PREEMPTED, Checkpoints, load_adapters, load_policy, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# Stage 1 on the learnable "safety" view (chosen always starts "safe help"), stage 2 against it.
OVERRIDES = [
    "stages.0.view=safety",
    "stages.0.steps=6",
    "stages.1.steps=3",
    "checkpoint.every=1",
    "optim.learning_rate=3e-3",
]


def _records(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[(r["stage"], r["step"])] = r  # the last record wins (a resumed run repeats steps)
    return out


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "pairs.jsonl")
    write_toy_data(path, rows=48)
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_path):
    run_dir = str(tmp_path_factory.mktemp("baseline"))
    config = load_config(TINY, OVERRIDES + [f"data.path={data_path}", f"train.run_dir={run_dir}"])
    result = train(config)
    return run_dir, result


def test_loss_goes_down_and_stage_two_starts_at_log_two(baseline):
    run_dir, result = baseline
    assert result.status == "done" and result.global_step == 9
    rec = _records(run_dir)
    first = [rec[(0, s)]["loss"] for s in range(1, 7)]
    assert first[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == initial reference
    assert first[-1] < first[0] - 0.05, first
    # Stage 2's first step: the reference is the stage-1 policy, so every term vanishes.
    s2 = rec[(1, 1)]
    assert s2["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for k in ("kl/chosen", "kl/rejected", "risk/chosen", "risk/rejected", "rewards/margins"):
        assert abs(s2[k]) < 1e-5, (k, s2[k])
    assert os.path.exists(os.path.join(run_dir, "config.json"))
    assert os.listdir(os.path.join(run_dir, "tensorboard"))


def _wait_for_records(proc, run_dir, records):
    """Waits (at most 240 s) until `proc` has logged `records` lines to the run's metrics.jsonl
    or has exited; returns the path of that file."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= records:
            break
        time.sleep(0.05)
    return metrics


@pytest.mark.slow  # two more tiny runs in subprocesses (about 80 s on 2 cores)
def test_kill_and_resume_equals_uninterrupted(baseline, data_path, tmp_path):
    base_dir, base = baseline
    run_dir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "rsa_jax", "train", TINY, *OVERRIDES]
    cmd += [f"data.path={data_path}", f"train.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = _wait_for_records(proc, run_dir, 4)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sum(1 for _ in open(metrics))
    assert killed_at < 9
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done at global step 9" in done.stdout
    base_rec, rec = _records(base_dir), _records(run_dir)
    assert sorted(rec) == sorted(base_rec)
    for key in base_rec:
        assert rec[key]["loss"] == base_rec[key]["loss"], key  # bitwise on the CPU
    _, params = load_policy(run_dir)
    for k, v in base.params.items():
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(jax.device_get(v)), k)


# A QLoRA run (nf4 base, rank 4) of 3 + 5 steps, a checkpoint after every step.
LORA_OVERRIDES = [
    "stages.0.view=safety",
    "stages.0.steps=3",
    "stages.1.steps=5",
    "checkpoint.every=1",
    "optim.learning_rate=3e-3",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.base_storage=nf4",
    "model.lora.block_size=16",
]
# What a metrics record holds besides the step's values: wall-clock timings.
TIMING = {"tokens_per_s", "pairs_per_s", "step_time_s", "mfu", "compile_s"}


def _final_checkpoint(run_dir):
    """(TrainState, the stage-2 reference adapters) of a LoRA run's final checkpoint."""
    engine, _ = load_adapters(run_dir)
    ckpt = Checkpoints(run_dir, read_only=True)
    try:
        step_id, meta = ckpt.latest_meta()
        assert meta["done"] and meta["stage"] == 1, meta
        state, reference = ckpt.restore(
            step_id,
            engine.abstract_state(),
            data_iter=None,
            abstract_reference=engine.model.abstract_params(),
        )
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, jax.device_get((state, reference)))


@pytest.mark.slow  # an in-process run and two subprocess runs per case (about 2 min on 2 cores)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_kill_and_resume_in_stage_two_equals_uninterrupted(data_path, tmp_path, dropout):
    """SIGKILL in the middle of stage 2 (its reference adapters are in the checkpoint), then a
    rerun: the adapters, their AdamW moments, the reference adapters and every logged value
    equal the uninterrupted run bit for bit (with adapter dropout too: its masks depend on the
    seed, stage and step only)."""
    overrides = [*LORA_OVERRIDES, f"model.lora.dropout={dropout}", f"data.path={data_path}"]
    base_dir = str(tmp_path / "uninterrupted")
    assert train(load_config(TINY, overrides + [f"train.run_dir={base_dir}"])).status == "done"

    run_dir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "rsa_jax", "train", TINY, *overrides, f"train.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # 6 records: stage 2's third step logged, so the checkpoint of its first step is complete
    # (an async save waits for the one before it).
    metrics = _wait_for_records(proc, run_dir, 6)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sum(1 for _ in open(metrics))
    assert killed_at < 8
    saved = [int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()]
    assert 3 < max(saved) < 8, saved  # the rerun resumes inside stage 2

    done = subprocess.run([*cmd, "-v"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done at global step 8" in done.stdout
    assert "resumed stage 1 at step" in done.stderr, done.stderr[-3000:]

    base_rec, rec = _records(base_dir), _records(run_dir)
    assert sorted(rec) == sorted(base_rec)
    for key, expected in base_rec.items():
        values = {k: v for k, v in expected.items() if k not in TIMING}
        assert {k: rec[key][k] for k in values} == values, key  # bitwise on the CPU
    if dropout > 0:  # stage 2 step 1: the policy drops adapter inputs, its reference never
        assert base_rec[(1, 1)]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    else:  # without dropout the policy starts equal to its reference
        assert base_rec[(1, 1)]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    (state, reference), (expected_state, expected_reference) = (
        _final_checkpoint(run_dir),
        _final_checkpoint(base_dir),
    )
    assert set(state.params) == set(expected_state.params) == set(reference)
    jax.tree.map(np.testing.assert_array_equal, state, expected_state)  # adapters, moments
    jax.tree.map(np.testing.assert_array_equal, reference, expected_reference)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(data_path, tmp_path):
    run_dir = str(tmp_path / "term")
    cmd = [sys.executable, "-m", "rsa_jax", "train", TINY, *OVERRIDES]
    cmd += [f"data.path={data_path}", f"train.run_dir={run_dir}", "checkpoint.every=100"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = _wait_for_records(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]  # 75: stopped, saved, rerun resumes
    assert "preempted" in out
    logged = sum(1 for _ in open(metrics))
    steps = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
    assert steps == [logged], (steps, logged)  # saved at the step it stopped after


def test_export_and_merge_write_loadable_hf_directories(baseline, tmp_path):
    from rsa_jax.cli import main
    from rsa_jax.models import load_hf
    from rsa_jax.training import merge_params

    run_dir, result = baseline
    out = str(tmp_path / "hf")
    assert main(["export", run_dir, out]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    from flax import nnx

    loaded = load_hf(out)
    flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(loaded))}
    for k, v in result.params.items():
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), k)
    merged = str(tmp_path / "merged")
    assert main(["merge", run_dir, run_dir, "--q", "0.25", "--out", merged]) == 0
    assert os.path.exists(os.path.join(merged, "model.safetensors"))
    a = {"w": np.array([1.0, 2.0]), "b": np.array([0.0])}
    b = {"w": np.array([3.0, 6.0]), "b": np.array([4.0])}
    m = merge_params(a, b, 0.25)
    np.testing.assert_allclose(m["w"], [1.5, 3.0])
    np.testing.assert_allclose(m["b"], [1.0])
    with pytest.raises(ValueError, match="different parameters"):
        merge_params(a, {"w": b["w"]}, 0.5)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(baseline, tmp_path, caplog):
    import shutil

    run_dir, _ = baseline
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    ckpts = os.path.join(copy, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert len(steps) >= 2
    latest = os.path.join(ckpts, str(steps[-1]), "state")
    for root, _, files in os.walk(latest):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with caplog.at_level("WARNING"):
        _, params = load_policy(copy)  # export/eval/merge: read-only
    assert any("left in place" in r.message for r in caplog.records)
    assert not os.path.exists(os.path.join(copy, "corrupt"))  # nothing moved
    assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == steps
    assert params  # the previous checkpoint restored


@pytest.mark.slow
def test_resume_between_stages_uses_the_finished_stage_as_reference(data_path, tmp_path):
    run_dir = str(tmp_path / "between")
    common = [f"data.path={data_path}", f"train.run_dir={run_dir}", "checkpoint.every=0"]
    first = load_config(TINY, OVERRIDES + common)
    only_stage_one = type(first)(**{**first.__dict__, "stages": first.stages[:1]})
    assert train(only_stage_one).global_step == 6
    # A second stage is a changed config: resuming with it is asked for explicitly.
    forced = dataclasses.replace(first, train=dataclasses.replace(first.train, resume="force"))
    result = train(forced)  # finds stage 0 done, starts stage 1 from its checkpoint
    assert result.status == "done" and result.global_step == 9
    rec = _records(run_dir)
    assert rec[(1, 1)]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(rec[(1, 1)]["kl/chosen"]) < 1e-5 and abs(rec[(1, 1)]["risk/rejected"]) < 1e-5


def test_more_steps_than_batches_is_a_clear_error(data_path, tmp_path):
    config = load_config(
        TINY,
        OVERRIDES
        + ["stages.0.steps=100000", f"data.path={data_path}", f"train.run_dir={tmp_path}"],
    )
    with pytest.raises(ValueError, match="steps=100000 but .* gives only .* batches"):
        train(config)


@pytest.mark.slow  # two tiny runs (25 s)
def test_a_user_optax_transformation_replaces_the_builtin_adamw(data_path, tmp_path):
    import optax

    from rsa_jax.training import Engine

    def run(tx, name):
        run_dir = str(tmp_path / name)
        overrides = [*OVERRIDES, "stages.0.steps=2", "stages.1.steps=1", "checkpoint.every=0"]
        config = load_config(
            TINY, overrides + [f"data.path={data_path}", f"train.run_dir={run_dir}"]
        )
        return run_dir, train(config, tx=tx)

    initial = Engine(load_config(TINY)).initial
    frozen_dir, frozen = run(optax.sgd(0.0), "sgd0")
    assert frozen.status == "done" and frozen.global_step == 3
    for k, v in initial.items():  # a zero learning rate moves nothing: the user's tx was used
        np.testing.assert_array_equal(np.asarray(frozen.params[k]), np.asarray(v), k)
    record = _records(frozen_dir)[(0, 1)]
    assert "learning_rate" not in record and record["grad_norm"] > 0
    _, moved = run(optax.sgd(0.5), "sgd")
    assert any(not np.array_equal(moved.params[k], initial[k]) for k in initial)


def _flat_hf(path):
    from flax import nnx

    from rsa_jax.models import load_hf

    return {
        "/".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(load_hf(path)))
    }


def test_stage_zero_export_is_the_stage_one_policy_and_merge_takes_any_policy(baseline, tmp_path):
    """RSA(P) from one run: the policy stage 0 ended with is kept (checkpoint retention removed
    stage 0's own checkpoints long ago), equals the reference that stage 1 trained against, and
    merges with the final policy from run directories or Hugging Face directories alike."""
    from rsa_jax.cli import main
    from rsa_jax.training import Checkpoints, load_policy

    run_dir, result = baseline
    engine, stage0 = load_policy(run_dir, stage=0)
    assert load_policy(run_dir, stage="helpfulness")[1].keys() == stage0.keys()
    ckpt = Checkpoints(run_dir, keep=3, async_save=False)
    try:
        step, meta = ckpt.latest_meta()
        assert meta["stage"] == 1 and meta["done"]
        _, reference = ckpt.restore(
            step,
            engine.abstract_state(),
            data_iter=None,
            abstract_reference=engine.model.abstract_params(),
        )
    finally:
        ckpt.close()
    for k in stage0:  # stage 1's frozen reference is stage 0's final policy, bitwise
        np.testing.assert_array_equal(np.asarray(stage0[k]), np.asarray(reference[k]), k)
    assert any(not np.array_equal(stage0[k], result.params[k]) for k in stage0)

    hf0, hf1 = str(tmp_path / "stage0"), str(tmp_path / "final")
    assert main(["export", run_dir, hf0, "--stage", "0"]) == 0
    assert main(["export", run_dir, hf1]) == 0
    a, b = _flat_hf(hf0), _flat_hf(hf1)
    for k in stage0:
        np.testing.assert_array_equal(a[k], np.asarray(stage0[k]), k)
    from_hf, from_runs = str(tmp_path / "m_hf"), str(tmp_path / "m_runs")
    assert main(["merge", hf0, hf1, "--q", "0.25", "--out", from_hf]) == 0
    assert main(["merge", f"{run_dir}@0", run_dir, "--q", "0.25", "--out", from_runs]) == 0
    merged, merged_runs = _flat_hf(from_hf), _flat_hf(from_runs)
    for k in a:
        np.testing.assert_allclose(merged[k], 0.75 * a[k] + 0.25 * b[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(merged_runs[k], merged[k], k)
    with pytest.raises(ValueError, match="stages are"):
        load_policy(run_dir, stage="nope")


def test_every_stage_data_is_checked_before_the_first_stage_trains(data_path, tmp_path):
    run_dir = tmp_path / "run"
    missing = str(tmp_path / "no_such_safety_pairs.jsonl")
    config = load_config(
        TINY,
        OVERRIDES
        + [f"data.path={data_path}", f"train.run_dir={run_dir}", f"stages.1.data_path={missing}"],
    )
    with pytest.raises(Exception, match="no_such_safety_pairs"):
        train(config)
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # stage 0 never took a step
    ckpts = run_dir / "checkpoints"
    assert not ckpts.exists() or not [d for d in os.listdir(ckpts) if d.isdigit()]


def test_a_run_directory_stands_alone_from_any_working_directory(data_path, tmp_path, monkeypatch):
    """A run trained from a relative model path loads (export, eval) from elsewhere: the run
    directory stores the model and tokenizer location as an absolute path."""
    from flax import nnx

    from rsa_jax.data import train_bpe_tokenizer
    from rsa_jax.eval import load_model
    from rsa_jax.models import Llama, save_hf, tiny_config

    tokenizer = train_bpe_tokenizer()
    save_hf(
        Llama(tiny_config(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0)),
        str(tmp_path / "models" / "sft"),
        tokenizer=tokenizer,
    )
    monkeypatch.chdir(tmp_path)
    overrides = [f"data.path={data_path}", "train.run_dir=run", "model.path=models/sft"]
    overrides += ["stages.0.steps=1", "stages.1.steps=1", "checkpoint.every=0"]
    result = train(load_config(TINY, overrides))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["model"]["path"] == str(tmp_path / "models" / "sft")
    _, params = load_policy(str(tmp_path / "run"))
    for k, v in result.params.items():
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(v), k)
    model, loaded_tokenizer = load_model(str(tmp_path / "run"))
    assert len(loaded_tokenizer) == len(tokenizer) and model.config.vocab_size >= len(tokenizer)


def test_rerunning_a_finished_run_answers_without_loading_anything(
    baseline, data_path, capsys, monkeypatch
):
    """Issue 25, item 6: the CLI reads the final checkpoint's metadata and says done; no
    tokenizer, model or compile (the engine is never built)."""
    from rsa_jax.cli import main
    from rsa_jax.training import _trainer, finished_step

    run_dir, result = baseline

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built to say the run is done")

    monkeypatch.setattr(_trainer, "Engine", no_engine)
    argv = ["train", TINY, *OVERRIDES, f"data.path={data_path}", f"train.run_dir={run_dir}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"done at global step {result.global_step} (finished earlier)" in out
    # Another config is not "finished": train() decides (here: it would refuse the resume).
    other = load_config(
        TINY,
        [
            *OVERRIDES[:-1],
            "optim.learning_rate=1e-3",
            f"data.path={data_path}",
            f"train.run_dir={run_dir}",
        ],
    )
    assert finished_step(other) is None
