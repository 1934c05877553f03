"""KV-cache generation against full-sequence recomputation; EOS stop; sampling controls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsa_jax.generate import generate
from rsa_jax.models import Llama, load_hf, save_hf, tiny_config

PROMPT_MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
N = 6


@pytest.fixture(scope="module")
def model():
    return Llama(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(0).integers(3, 256, size=PROMPT_MASK.shape).astype(np.int32)


def _full_logprobs(model, prompt, tokens):
    """Log-probs of `tokens` [B, N] recomputed by one full forward over prompt + tokens."""
    ids = np.concatenate([prompt, tokens], axis=1)
    mask = np.concatenate([PROMPT_MASK, np.ones(tokens.shape, bool)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = model.logits(model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))
    p = prompt.shape[1]
    logp = jax.nn.log_softmax(logits[:, p - 1 : -1], axis=-1)  # [B, N, V]
    return np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]), (
        np.asarray(jnp.argmax(logits[:, p - 1 : -1], axis=-1))
    )


def test_greedy_kv_cache_equals_full_recomputation(model, prompt):
    out = generate(model, prompt, PROMPT_MASK, jax.random.key(0), max_new_tokens=N)
    tokens = np.asarray(out.tokens)
    want_logp, want_argmax = _full_logprobs(model, prompt, tokens)
    np.testing.assert_array_equal(tokens, want_argmax)  # greedy: each token is the full argmax
    np.testing.assert_allclose(np.asarray(out.logprobs), want_logp, rtol=1e-5, atol=1e-5)
    assert (np.asarray(out.lengths) == N).all()


def test_scanned_model_generates_the_same(model, prompt, tmp_path):
    save_hf(model, str(tmp_path))
    scanned = load_hf(str(tmp_path), scan_layers=True)
    a = generate(model, prompt, PROMPT_MASK, jax.random.key(0), max_new_tokens=N)
    b = generate(scanned, prompt, PROMPT_MASK, jax.random.key(0), max_new_tokens=N)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), rtol=1e-5, atol=1e-5)


def test_sampled_kv_cache_logprobs_equal_full_recomputation(model, prompt):
    kwargs = dict(max_new_tokens=N, temperature=1.5, top_k=50, top_p=0.95)
    out = generate(model, prompt, PROMPT_MASK, jax.random.key(1), **kwargs)
    again = generate(model, prompt, PROMPT_MASK, jax.random.key(1), **kwargs)
    other = generate(model, prompt, PROMPT_MASK, jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(other.tokens))
    want_logp, _ = _full_logprobs(model, prompt, np.asarray(out.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), want_logp, rtol=1e-5, atol=1e-5)


def test_top_k_one_and_tiny_top_p_are_greedy(model, prompt):
    greedy = generate(model, prompt, PROMPT_MASK, jax.random.key(0), max_new_tokens=N).tokens
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        out = generate(
            model,
            prompt,
            PROMPT_MASK,
            jax.random.key(3),
            max_new_tokens=N,
            temperature=2.0,
            **kwargs,
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy))


def test_stops_per_row_at_eos(model, prompt):
    greedy = np.asarray(
        generate(model, prompt, PROMPT_MASK, jax.random.key(0), max_new_tokens=N).tokens
    )
    eos = int(greedy[0, 2])  # row 0 hits it at step 2 (maybe earlier); other rows maybe never
    out = generate(
        model, prompt, PROMPT_MASK, jax.random.key(0), max_new_tokens=N, eos_ids=(eos,), pad_id=0
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(len(prompt)):
        hits = np.flatnonzero(greedy[row] == eos)
        n = hits[0] + 1 if len(hits) else N
        assert lengths[row] == n
        np.testing.assert_array_equal(tokens[row, :n], greedy[row, :n])
        assert (tokens[row, n:] == 0).all()


def test_right_padded_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(
            model,
            np.ones((1, 3), np.int32),
            np.array([[1, 1, 0]], bool),
            jax.random.key(0),
            max_new_tokens=2,
        )


def test_a_rows_sample_depends_on_its_key_and_row_id_only(model, prompt):
    kwargs = dict(max_new_tokens=N, temperature=1.0)
    batch = generate(model, prompt, PROMPT_MASK, jax.random.key(5), **kwargs)
    # Row 1 alone, or in another batch order, with its row id: the same tokens.
    alone = generate(model, prompt[1:2], PROMPT_MASK[1:2], jax.random.key(5), row_ids=[1], **kwargs)
    order = [2, 0, 1]
    shuffled = generate(
        model, prompt[order], PROMPT_MASK[order], jax.random.key(5), row_ids=order, **kwargs
    )
    tokens = np.asarray(batch.tokens)
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], tokens[1])
    np.testing.assert_array_equal(np.asarray(shuffled.tokens), tokens[order])
    # Another row id draws another sample from the same prompt.
    other = generate(model, prompt[1:2], PROMPT_MASK[1:2], jax.random.key(5), row_ids=[7], **kwargs)
    assert not np.array_equal(np.asarray(other.tokens)[0], tokens[1])
    with pytest.raises(ValueError, match=r"row_ids has shape \(2,\), expected \(1,\)"):
        generate(model, prompt[1:2], PROMPT_MASK[1:2], jax.random.key(5), row_ids=[1, 2], **kwargs)
