"""The optimizer with traced hyperparameters equals optax's AdamW chain, and the step cache gives
stages that differ only in hyperparameters one compiled program."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rsa_jax.config import Config, MeshConfig, ModelConfig, OptimConfig, StageConfig, TrainConfig
from rsa_jax.losses import Kernel
from rsa_jax.models import tiny_config
from rsa_jax.training import (
    BATCH_KEYS,
    Engine,
    Hyper,
    Layout,
    PairObjective,
    device_copy,
    init_params,
    state_shardings,
)
from rsa_jax.training._engine import clear_step_cache
from rsa_jax.training._mesh import place_batch
from rsa_jax.training._optim import (
    OptimHyper,
    apply_update,
    learning_rate_at,
    make_optimizer,
    weight_decay_mask,
)


@pytest.mark.parametrize("warmup_ratio,final", [(0.0, 0.0), (0.1, 0.0), (0.25, 0.1)])
def test_learning_rate_equals_optax_warmup_cosine(warmup_ratio, final):
    optim = OptimConfig(learning_rate=3e-4, warmup_ratio=warmup_ratio, final_lr_ratio=final)
    total = 40
    warmup = int(warmup_ratio * total)
    reference = optax.warmup_cosine_decay_schedule(
        0.0, 3e-4, warmup, max(total, warmup + 1), 3e-4 * final
    )
    hyper = OptimHyper.from_config(optim, total)
    ours = jax.jit(lambda s: learning_rate_at(s, hyper))
    for step in range(total + 3):
        # float32 cosines: agree to 1e-6 of the peak rate (near the end the values are tiny).
        np.testing.assert_allclose(float(ours(step)), float(reference(step)), rtol=0, atol=3e-10)


def test_apply_update_equals_optax_adamw_with_clipping_and_masked_decay():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    optim = OptimConfig(learning_rate=1e-2, warmup_ratio=0.2, weight_decay=0.1, max_grad_norm=0.5)
    total = 10
    hyper = OptimHyper.from_config(optim, total)
    reference = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, total, 0.0),
            weight_decay=0.1,
            mask=weight_decay_mask,
        ),
    )
    tx = make_optimizer(optim)
    ref_params, ref_state = params, reference.init(params)
    our_params, our_state = params, tx.init(params)
    update = jax.jit(apply_update, static_argnums=0)
    for step in range(6):
        grads = {
            k: jnp.asarray(rng.normal(size=v.shape) * 3, jnp.float32) for k, v in params.items()
        }
        u, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, u)
        our_params, our_state, norm, lr = update(tx, grads, our_state, our_params, step, hyper)
        np.testing.assert_allclose(float(norm), float(optax.global_norm(grads)), rtol=1e-6)
        for k in params:
            np.testing.assert_allclose(our_params[k], ref_params[k], rtol=1e-6, atol=1e-7)
    # Weight decay reached the matrix and not the bias: with zero gradients only decay moves w.
    zero = {k: jnp.zeros_like(v) for k, v in params.items()}
    moved, _, _, _ = update(tx, zero, tx.init(our_params), our_params, 3, hyper)
    assert np.all(np.asarray(moved["b"]) == np.asarray(our_params["b"]))
    assert np.any(np.asarray(moved["w"]) != np.asarray(our_params["w"]))


def _batch(seed, pairs=2, length=12, vocab=256, left_pad=False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, (2 * pairs, length)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    if left_pad:
        mask[1, :3] = False  # a left-padded prompt
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    labels = np.concatenate([ids[:, 1:], np.zeros((2 * pairs, 1), np.int32)], 1)
    loss_mask = np.zeros_like(mask)
    loss_mask[:, 5:-1] = True
    return dict(
        input_ids=ids, positions=positions, attention_mask=mask, labels=labels, loss_mask=loss_mask
    )


@pytest.mark.slow  # compiles two stages' engines (about 40 s on 2 cores)
def test_stages_differing_in_hyperparameters_share_one_compiled_step():
    clear_step_cache()
    model = ModelConfig(compute_dtype="float32", remat=False)
    config = Config(model=model, train=TrainConfig(chunk_size=4))
    engine = Engine(config, layout=Layout.single_device(MeshConfig().rules), llama=tiny_config())
    params = engine.initial
    reference = init_params(engine.model, dataclasses.replace(model, init_seed=1))
    batch = place_batch(
        {k: v for k, v in _batch(0).items() if k in BATCH_KEYS}, engine.layout.batch
    )
    variants = [
        (StageConfig(beta=0.1, mu=0.95), OptimConfig(learning_rate=1e-3), 10),
        (StageConfig(beta=0.05, alpha=0.2, mu=0.8, gamma=0.9), OptimConfig(learning_rate=5e-4), 7),
        (StageConfig(beta=0.2, mu=0.5), OptimConfig(learning_rate=1e-4, weight_decay=0.1), 3),
    ]
    steps, losses = [], []
    for stage, optim, total in variants:
        fresh = engine.new_state(device_copy(params))  # the step donates its state
        step = engine.compiled_step(engine.objective(stage), state_shardings(fresh))
        hyper = jax.device_put(Hyper.for_stage(stage, optim, total), engine.layout.replicated)
        fresh, metrics = step(fresh, reference, batch, hyper)
        steps.append(step)
        losses.append(float(metrics["loss"]))
    assert all(s is steps[0] for s in steps)
    assert steps[0]._cache_size() == 1
    # Full fine-tuning: a stage against the previous stage's policy runs the same program.
    previous = engine.compiled_step(
        engine.objective(variants[0][0]), state_shardings(fresh), reference_adapters=True
    )
    assert previous is steps[0]
    # The variants really differ (the hyperparameters reached the program).
    assert len({round(v, 7) for v in losses}) == 3
    # A different kernel (another risk functional) is another program.
    other = engine.compiled_step(
        PairObjective(Kernel(risk="erm"), chunk_size=4), state_shardings(fresh)
    )
    assert other is not steps[0]


# How the step is compiled: one microbatch runs without the microbatch scan and gives the scan's
# update.
_PROGRAM_STAGE = StageConfig(loss="ra_dpo", risk="cvar_reference", beta=0.1, mu=0.9)


def _one_step(microbatches: int, head: str = "logits"):
    """(metrics, gradient, compiled HLO text) of one step of the tiny model. The optimizer is
    plain SGD with rate 1, so the gradient is params before - params after (Adam's first step,
    lr * g / (|g| + eps), would amplify rounding wherever |g| is tiny). The reference is another
    init, so the policy's log-ratios are far from 0 (no tie at the cvar cut)."""
    clear_step_cache()
    model = ModelConfig(compute_dtype="float32", remat=False)
    config = Config(
        model=model,
        optim=OptimConfig(learning_rate=1e-3, microbatches=microbatches),
        train=TrainConfig(chunk_size=4, head=head),
    )
    layout = Layout.single_device(MeshConfig().rules)
    engine = Engine(config, layout=layout, llama=tiny_config(), tx=optax.sgd(1.0))
    reference = init_params(engine.model, dataclasses.replace(model, init_seed=1))
    before = jax.device_get(engine.initial)
    state = engine.new_state(device_copy(engine.initial))
    arrays = _batch(0, pairs=4, left_pad=True)
    batch = place_batch({k: v for k, v in arrays.items() if k in BATCH_KEYS}, engine.layout.batch)
    step = engine.compiled_step(engine.objective(_PROGRAM_STAGE), state_shardings(state))
    hyper = Hyper.for_stage(_PROGRAM_STAGE, config.optim, 10)
    hyper = jax.device_put(hyper, engine.layout.replicated)
    hlo = step.lower(state, reference, batch, hyper).compile().as_text()
    state, metrics = step(state, reference, batch, hyper)
    after = jax.device_get(state.params)
    return jax.device_get(metrics), {k: before[k] - after[k] for k in before}, hlo


def _assert_gradients_close(g1, g2):
    """Equal to float32 rounding of sums: elementwise within 1e-4 relative, or 1e-5 of the
    parameter's largest gradient entry (entries near 0 carry absolute, not relative, error)."""
    assert set(g1) == set(g2)
    for k in g1:
        scale = float(np.max(np.abs(g2[k])))
        assert scale > 0, k
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)


@pytest.mark.slow  # two compiled steps per head (about 30 s on 2 cores for the logits head)
@pytest.mark.parametrize("head", ["logits", "fused"])
def test_one_microbatch_without_scan_equals_the_scan_over_two(head):
    m1, p1, hlo1 = _one_step(1, head)
    m2, p2, hlo2 = _one_step(2, head)
    # The one-microbatch program has no loop over microbatches (the loss head's row blocks
    # loop in both programs).
    assert hlo1.count(" while(") < hlo2.count(" while(")
    assert set(m1) == set(m2)
    for k in m1:  # per-pair sums over 2 microbatches: the same pairs, another summation order
        np.testing.assert_allclose(m1[k], m2[k], rtol=2e-5, atol=1e-7, err_msg=k)
    _assert_gradients_close(p1, p2)
    assert np.isfinite(m1["loss"]) and m1["grad_norm"] > 0
