"""Held-out evaluation during training: the held-out pairs (data.eval_fraction leaves them out
of training; data.eval_path reads its own file), the eval/* metrics (at the start of a stage the
policy is its reference: loss log 2, margins and KL 0), one compiled program for every call,
and `train.eval_every` writing eval/* records beside the training ones."""

from __future__ import annotations

import json
import math
import os

import pytest

from rsa_jax.config import ConfigError, load_config
from rsa_jax.data import write_toy_data
from rsa_jax.training import Engine, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _config(tmp_path, *extra):
    data = str(tmp_path / "pairs.jsonl")
    if not os.path.exists(data):
        write_toy_data(data, rows=24)
    overrides = [f"data.path={data}", f"train.run_dir={tmp_path / 'run'}", "stages.0.steps=2"]
    overrides += ["stages.1.steps=1", "checkpoint.async_save=false", "checkpoint.every=0"]
    return load_config(TINY, [*overrides, *extra])


def test_eval_fraction_holds_pairs_out_and_evaluates_in_one_compile(tmp_path):
    engine = Engine(_config(tmp_path, "data.eval_fraction=0.34"), check_devices=False)
    held = engine.heldout_batches(0)
    assert len(held) == 2  # round(24 * 0.34) = 8 held-out pairs: 2 batches of 4
    _, train_steps = engine.stage_batches(0)
    assert train_steps == 2  # stages.0.steps; the 16 kept pairs give 4 batches
    stage = engine.stage(0, engine.initial)
    first = engine.evaluate(stage, held)
    # The policy is its reference before the first step: the DPO-family loss is log 2.
    assert first["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["eval/rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert first["eval/kl/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["eval/pairs"] == 8
    assert {"eval/rewards/accuracies", "eval/risk/chosen"} <= set(first)
    engine.fit(stage)  # two training steps
    second = engine.evaluate(stage, held)
    assert second["eval/loss"] != first["eval/loss"]
    fn = engine.compiled_eval_step(
        engine.objective(stage.config),
        {k: v.sharding for k, v in stage.state.params.items()},
        reference_adapters=stage.config.follows_previous,
    )
    assert fn._cache_size() == 1  # every call so far ran one compiled program


def test_eval_path_and_the_settings_are_checked(tmp_path):
    held = str(tmp_path / "held.jsonl")
    write_toy_data(held, rows=8, seed=5)
    engine = Engine(_config(tmp_path, f"data.eval_path={held}"), check_devices=False)
    assert len(engine.heldout_batches(1)) == 2
    with pytest.raises(ConfigError, match="train.eval_every: needs held-out pairs"):
        _config(tmp_path, "train.eval_every=1")
    with pytest.raises(ConfigError, match="data.eval_fraction: must lie in"):
        _config(tmp_path, "data.eval_fraction=1.5")
    tiny = Engine(_config(tmp_path, "data.eval_fraction=0.1"), check_devices=False)
    with pytest.raises(ValueError, match="2 held-out pairs, fewer than one batch"):
        tiny.heldout_batches(0)


@pytest.mark.slow  # a whole tiny run; tests/training/test_trackers.py checks the same records
def test_eval_every_logs_eval_records_beside_the_training_ones(tmp_path):
    config = _config(tmp_path, "data.eval_fraction=0.34", "train.eval_every=2")
    train(config)
    with open(os.path.join(config.train.run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "eval/loss" in r]
    # stage 0: at its step 2 (= its end); stage 1 (1 step): at its end
    assert [(r["stage"], r["step"], r["global_step"]) for r in evals] == [(0, 2, 2), (1, 1, 3)]
    assert all(r["eval/pairs"] == 8 for r in evals)
