"""How the train step is compiled: one microbatch runs without the microbatch scan and gives the
scan's update."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

from rsa_jax.config import Config, MeshConfig, ModelConfig, OptimConfig, StageConfig, TrainConfig
from rsa_jax.models import tiny_config
from rsa_jax.training import (
    BATCH_KEYS,
    Engine,
    Hyper,
    Layout,
    clear_step_cache,
    device_copy,
    init_params,
    place_batch,
    state_shardings,
)

STAGE = StageConfig(loss="ra_dpo", risk="cvar_reference", beta=0.1, mu=0.9)


def _batch(pairs=4, length=12, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, (2 * pairs, length)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :3] = False  # a left-padded prompt
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    labels = np.concatenate([ids[:, 1:], np.zeros((2 * pairs, 1), np.int32)], 1)
    loss_mask = np.zeros_like(mask)
    loss_mask[:, 5:-1] = True
    return dict(
        input_ids=ids, positions=positions, attention_mask=mask, labels=labels, loss_mask=loss_mask
    )


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
    batch = place_batch({k: v for k, v in _batch().items() if k in BATCH_KEYS}, engine.layout.batch)
    step = engine.compiled_step(engine.objective(STAGE), state_shardings(state))
    hyper = jax.device_put(Hyper.for_stage(STAGE, config.optim, 10), engine.layout.replicated)
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
