"""LoRA adapter dropout in the train step: off (rate 0) it draws nothing and is the step without
dropout bit for bit; on, it changes training, deterministically for a seed, stage and step; the
masks keep 1 - p of the inputs scaled by 1 / (1 - p); vmap variants with other seeds draw their
own masks in one program; PEFT's config carries the rate. (Exact resume with dropout on: the
SIGKILL test in test_train.py.)"""

import dataclasses
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsa_jax.config import load_config
from rsa_jax.data import write_toy_data
from rsa_jax.models import project, save_peft
from rsa_jax.sweep import Variant
from rsa_jax.sweep._vmap import check_vmappable
from rsa_jax.training import Engine, Hyper, TrainState, device_copy, stage_dropout_key
from rsa_jax.training._step import microbatch_dropout_keys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
OVERRIDES = [
    "stages.0.view=safety",
    "optim.learning_rate=3e-3",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.base_storage=float32",
]
RATE = 0.3


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "pairs.jsonl")
    write_toy_data(path, rows=48)
    return path


def _config(data_path, dropout, *extra):
    return load_config(
        TINY,
        OVERRIDES + [f"model.lora.dropout={dropout}", f"data.path={data_path}", *extra],
    )


@pytest.fixture(scope="module")
def engines(data_path):
    """(engine without dropout, its stage 0), (engine with dropout RATE, its stage 0), and two
    placed batches of stage 0."""
    out = []
    for dropout in (0.0, RATE):
        engine = Engine(_config(data_path, dropout), check_devices=False)
        out.append((engine, engine.stage(0, engine.initial)))
    stage = out[0][1]
    batches = [out[0][0].place(next(stage.batches)) for _ in range(2)]
    return out[0], out[1], batches


def _run(engine, stage, hyper, batches):
    """The stage's step applied to a fresh copy of the initial state, once per batch: (final
    state as NumPy, per-step metrics as floats)."""
    state = engine.new_state(device_copy(engine.initial))
    metrics = []
    for batch in batches:
        state, m = stage.step_fn(state, stage.reference, batch, hyper)
        metrics.append({k: float(v) for k, v in m.items()})
    return jax.tree.map(np.asarray, jax.device_get(state)), metrics


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _differs(a: dict, b: dict) -> bool:
    return any(not np.array_equal(a[k], b[k]) for k in a)


def _jaxpr(stage, hyper, batch):
    return str(jax.make_jaxpr(stage.step_fn)(stage.state, stage.reference, batch, hyper))


@pytest.mark.slow  # the module's LoRA engines (about 40 s on 2 cores)
def test_rate_zero_draws_no_key_and_is_the_step_without_dropout(engines):
    (off, s_off), (on, s_on), batches = engines
    assert s_off.hyper.dropout_key is None and s_on.hyper.dropout_key is not None
    # Rate 0: nothing random in the program. Rate > 0: the masks are drawn in the step.
    assert "random_bits" not in _jaxpr(s_off, s_off.hyper, batches[0])
    assert "random_bits" in _jaxpr(s_on, s_on.hyper, batches[0])
    # The dropout model stepped without a key is the rate-0 run, bit for bit.
    expected = _run(off, s_off, s_off.hyper, batches)
    got = _run(on, s_on, s_on.hyper._replace(dropout_key=None), batches)
    _assert_trees_equal(got, expected)


@pytest.mark.slow  # three LoRA runs with dropout (20 s)
def test_dropout_changes_training_deterministically_per_seed_and_stage(engines):
    (off, s_off), (on, s_on), batches = engines
    (plain, plain_metrics) = _run(off, s_off, s_off.hyper, batches)
    (state, metrics) = _run(on, s_on, s_on.hyper, batches)
    # Same seed, stage and steps: the same masks, bit for bit.
    _assert_trees_equal(_run(on, s_on, s_on.hyper, batches), (state, metrics))
    # Step 1: B = 0, so the dropped adapter branch adds exactly nothing to the forward (and the
    # reference, the base with adapters off, never drops): log 2 either way...
    assert metrics[0]["loss"] == plain_metrics[0]["loss"]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # ... but B's gradient saw the dropped inputs: the update, and so step 2's loss, differ.
    assert _differs(state.params, plain.params)
    assert abs(metrics[1]["loss"] - plain_metrics[1]["loss"]) > 1e-7
    # Another train.seed, or another stage, draws other masks.
    rep = on.layout.replicated
    for key in (
        stage_dropout_key(on.config, 1),
        stage_dropout_key(_config_with_seed(on.config, 1), 0),
    ):
        hyper = s_on.hyper._replace(dropout_key=jax.device_put(key, rep))
        other, _ = _run(on, s_on, hyper, batches)
        assert _differs(other.params, state.params)


def _config_with_seed(config, seed):
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


def _identity_adapter(rate, key, d=64):
    """A module whose projection "q" is y = dropout(x): W = 0, A = B = identity (r = d),
    scale 1."""
    eye = jnp.eye(d, dtype=jnp.float32)
    return types.SimpleNamespace(
        q=nnx.Variable(jnp.zeros((d, d), jnp.float32)),
        q_lora_a=nnx.Variable(eye),
        q_lora_b=nnx.Variable(eye),
        lora_scale=1.0,
        lora_dropout=rate,
        lora_key=nnx.Variable(key),
    )


def _dropped_ones(rate, key, shape=(2, 2048, 64)):
    module = _identity_adapter(rate, key, shape[-1])
    return np.asarray(project(module, "q", "bld,de->ble", jnp.ones(shape), jnp.float32))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_masks_keep_one_minus_p_scaled_and_change_with_step_and_microbatch(rate):
    stage_key = jax.random.fold_in(jax.random.key(0), 7)
    keys = microbatch_dropout_keys(stage_key, jnp.int32(0), 2)  # step 0, two microbatches
    y = _dropped_ones(rate, keys[0])
    # Inverted dropout: every input is dropped (0) or kept and scaled by exactly 1 / (1 - p).
    kept = y != 0
    np.testing.assert_array_equal(y[kept], np.float32(1.0) / np.float32(1.0 - rate))
    n = y.size
    keep_rate = kept.mean()
    assert abs(keep_rate - (1 - rate)) <= 5 * math.sqrt(rate * (1 - rate) / n), keep_rate
    # The same key draws the same mask; another microbatch or step draws another.
    np.testing.assert_array_equal(_dropped_ones(rate, keys[0]), y)
    next_step = microbatch_dropout_keys(stage_key, jnp.int32(1), 2)
    for other in (keys[1], next_step[0]):
        agree = (_dropped_ones(rate, other) != 0) == kept
        # Independent masks agree on a fraction (1-p)^2 + p^2 of the entries, far below 1.
        assert agree.mean() < 1 - rate * (1 - rate), agree.mean()


@pytest.mark.slow  # compiles a vmapped LoRA step (the default suite is held to 15 min)
def test_vmap_variants_with_other_seeds_draw_their_own_masks(engines, data_path, tmp_path):
    (_, _), (on, s_on), batches = engines
    configs = [_config_with_seed(on.config, seed) for seed in (0, 1)]
    # A vmap sweep accepts variants that differ in train.seed (their keys are traced inputs).
    check_vmappable([Variant(f"s{i}", (), c) for i, c in enumerate(configs)])
    rep = on.layout.replicated
    hypers = [
        s_on.hyper._replace(dropout_key=jax.device_put(stage_dropout_key(c, 0), rep))
        for c in configs
    ]
    singles = [_run(on, s_on, h, batches[:1])[0] for h in hypers]
    assert _differs(singles[0].params, singles[1].params)

    k = len(configs)
    policy = jax.tree.map(lambda x: jnp.repeat(x[None], k, axis=0), on.initial)
    state = TrainState(policy, jax.vmap(on.tx.init)(policy), jnp.zeros((k,), jnp.int32))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *hypers)
    step = on.vmapped_step(on.objective(s_on.config), None)
    state, _ = step(state, on.frozen(None), batches[0], stacked)
    for j, single in enumerate(singles):
        for name, value in single.params.items():
            # vmap batches the matmuls: rounding only (as the vmap sweep's own test).
            np.testing.assert_allclose(
                np.asarray(state.params[name][j]), value, rtol=1e-5, atol=1e-7, err_msg=name
            )


@pytest.mark.slow  # the module's LoRA engines
def test_peft_config_carries_the_dropout_rate(engines, tmp_path):
    (_, _), (on, _), _ = engines
    save_peft(on.model.lora, on.initial, str(tmp_path))
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        assert json.load(f)["lora_dropout"] == RATE


def test_hyper_without_a_key_is_the_two_field_pytree():
    """A run without dropout passes the same leaves as before the key existed."""
    hyper = Hyper.for_stage(load_config(TINY).stages[0], None, 1)
    assert hyper.dropout_key is None
    assert len(jax.tree.leaves(hyper)) == len(jax.tree.leaves((hyper.loss, hyper.optim)))
