"""Attention through jax.nn.dot_product_attention against the explicit masked-softmax einsums the
model used before (padding on both sides, GQA, a KV cache longer than the queries), and the
`attention` switch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsa_jax.models import (
    Llama,
    LlamaConfig,
    attention_implementation,
    load_hf,
    save_hf,
    tiny_config,
)
from rsa_jax.models._llama import attention_allowed

# The cases of each grid that the default suite runs; `make test-slow` runs every case
# (tests/conftest.py marks the others slow).
DEFAULT_CASES = {
    "test_matches_einsum_attention_with_padding_on_both_sides": ["heads1"],
}

# Left-padded prompts and right-padded responses, as the data pipeline lays them out.
MASK = np.array(
    [[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]], bool
)


def einsum_attention(q, k, v, allowed):
    """The model's previous attention: [B, K, G, L, S] scores, -1e30 where not allowed."""
    b, length, h, e = q.shape
    groups = h // k.shape[2]
    q = q.reshape(b, length, k.shape[2], groups, e)
    scores = jnp.einsum("blkge,bske->bkgls", q, k).astype(jnp.float32) / math.sqrt(e)
    scores = jnp.where(allowed[:, None, None], scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgls,bske->blkge", weights, v).reshape(b, length, h, e)


def _attention_module(config):
    return Llama(config, rngs=nnx.Rngs(0)).layers[0].attention


def _qkv(b, length, s, h, k, e, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(b, length, h, e)), jnp.float32),
        jnp.asarray(rng.normal(size=(b, s, k, e)), jnp.float32),
        jnp.asarray(rng.normal(size=(b, s, k, e)), jnp.float32),
    )


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
def test_matches_einsum_attention_with_padding_on_both_sides(heads):
    h, kv = heads
    config = tiny_config(num_attention_heads=h, num_key_value_heads=kv, attention="xla")
    attn = _attention_module(config)
    q, k, v = _qkv(*MASK.shape, MASK.shape[1], h, kv, config.head_dim)
    allowed = attention_allowed(jnp.asarray(MASK))
    o = attn.o[...]
    want = jnp.einsum("blhe,hed->bld", einsum_attention(q, k, v, allowed), o)
    got = attn.attend(q, k, v, allowed, jnp.float32)
    # Real query rows agree; padding query rows (which see no key) stay finite.
    np.testing.assert_allclose(np.asarray(got)[MASK], np.asarray(want)[MASK], rtol=2e-6, atol=2e-6)
    assert np.isfinite(np.asarray(got)).all()

    # Gradients with respect to q, k, v agree as well, through the real rows only.
    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(jnp.asarray(MASK)[..., None, None], jnp.sin(fn(q, k, v)), 0.0))

    g_want = jax.grad(lambda *a: loss(lambda *b: einsum_attention(*b, allowed), *a), (0, 1, 2))(
        q, k, v
    )
    new = jax.nn.dot_product_attention
    g_got = jax.grad(
        lambda *a: loss(lambda *b: new(*b, mask=allowed[:, None], implementation="xla"), *a),
        (0, 1, 2),
    )(q, k, v)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_kv_cache_shape_matches_einsum_attention():
    # Decoding: 2 new queries against 8 cached slots, some of them empty (left padding).
    b, length, s, h, kv, e = 3, 2, 8, 4, 2, 16
    config = tiny_config(attention="xla")
    attn = _attention_module(config)
    q, k, v = _qkv(b, length, s, h, kv, e, seed=3)
    valid = np.ones((b, s), bool)
    valid[0, :3] = False  # row 0: a left-padded prompt
    valid[2, 6:] = False  # row 2: slots not written yet
    allowed = jnp.asarray(np.broadcast_to(valid[:, None, :], (b, length, s)))
    want = jnp.einsum("blhe,hed->bld", einsum_attention(q, k, v, allowed), attn.o[...])
    got = attn.attend(q, k, v, allowed, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6)


def test_bfloat16_compute_matches_einsum_attention():
    config = tiny_config(attention="auto")
    attn = _attention_module(config)
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(*MASK.shape, MASK.shape[1], 4, 2, 16, seed=5))
    allowed = attention_allowed(jnp.asarray(MASK))
    o = attn.o[...].astype(jnp.bfloat16)
    want = jnp.einsum("blhe,hed->bld", einsum_attention(q, k, v, allowed), o)
    got = attn.attend(q, k, v, allowed, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32)[MASK], np.asarray(want, np.float32)[MASK], rtol=0.02, atol=0.02
    )


def test_implementation_choice():
    on_gpu = jax.default_backend() == "gpu"
    assert attention_implementation("auto", jnp.float32, 64) == "xla"
    assert attention_implementation("auto", jnp.bfloat16, 64) == ("cudnn" if on_gpu else "xla")
    assert attention_implementation("auto", jnp.bfloat16, 72) == ("cudnn" if on_gpu else "xla")
    assert attention_implementation("auto", jnp.bfloat16, 256) == "xla"  # past cuDNN's head dim
    assert attention_implementation("xla", jnp.bfloat16, 64) == "xla"
    assert attention_implementation("cudnn", jnp.float32, 64) == "cudnn"
    with pytest.raises(ValueError, match="attention 'flash' is not one of auto, xla, cudnn"):
        tiny_config(attention="flash")


def test_model_switch_xla_equals_auto_and_load_hf_sets_it(tmp_path):
    model = Llama(tiny_config(), rngs=nnx.Rngs(1))
    save_hf(model, str(tmp_path))
    loaded = load_hf(str(tmp_path), attention="xla")
    assert loaded.config.attention == "xla"
    assert load_hf(str(tmp_path)).config.attention == "auto"
    # The switch is not part of config.json: transformers' configs never see it.
    assert "attention" not in LlamaConfig.from_dir(str(tmp_path)).to_hf()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, MASK.shape))
    positions = jnp.asarray(np.maximum(np.cumsum(MASK, axis=1) - 1, 0))
    mask = jnp.asarray(MASK)
    np.testing.assert_array_equal(
        np.asarray(loaded(ids, positions, mask)), np.asarray(model(ids, positions, mask))
    )


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_matches_xla_on_gpu():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(*MASK.shape, MASK.shape[1], 4, 2, 64, seed=7))
    allowed = attention_allowed(jnp.asarray(MASK))[:, None]
    a = jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation="cudnn")
    b = jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation="xla")
    np.testing.assert_allclose(
        np.asarray(a, np.float32)[MASK], np.asarray(b, np.float32)[MASK], rtol=0.02, atol=0.02
    )
