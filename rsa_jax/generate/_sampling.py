"""Jitted batched sampling from the NNX Llama with a fixed-shape KV cache.

Dimension legend: B batch, P prompt slots, N new tokens, S = P + N cache slots, K key/value
heads, E head dim, V vocabulary.

Prompts come LEFT-padded (as the data pipeline lays them out), so every row's last prompt token
sits in slot P - 1 and generated token i goes to slot P + i for all rows. The prompt is prefilled
in one forward; then a `lax.while_loop` decodes one token per step, attending over the cache
slots written so far that hold real tokens. Shapes depend only on (B, P, N): one compile per
bucket. Temperature, top-k and top-p are traced, so changing them does not recompile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rsa_jax.models import Llama, rope_frequencies


class Cache(NamedTuple):
    keys: jax.Array  # [layers, B, S, K, E]
    values: jax.Array  # [layers, B, S, K, E]
    valid: jax.Array  # [B, S] bool: slot holds a real token


def _cached_forward(model: Llama, cache: Cache, ids, positions, start):
    """Runs `ids` [B, T] at cache slots [start, start + T); returns (hidden [B, T, D], cache).

    `cache.valid` must already mark the new slots. Query slot start + i attends to the valid
    slots up to and including itself.
    """
    dtype = model.compute_dtype
    inv_freq = rope_frequencies(model.config)
    t, s = ids.shape[1], cache.valid.shape[1]
    query_slot = start + jnp.arange(t)  # [T]
    allowed = (jnp.arange(s)[None, :] <= query_slot[:, None])[None] & cache.valid[:, None, :]
    x = jnp.take(model.embed[...], ids, axis=0).astype(dtype)  # [B, T, D]

    def layer(x, block, layer_keys, layer_values):
        q, k, v = block.attention.project(block.input_norm(x), positions, inv_freq, dtype)
        k_all = jax.lax.dynamic_update_slice_in_dim(layer_keys, k.astype(dtype), start, 1)
        v_all = jax.lax.dynamic_update_slice_in_dim(layer_values, v.astype(dtype), start, 1)
        x = x + block.attention.attend(q, k_all, v_all, allowed, dtype).astype(x.dtype)
        x = x + block.mlp(block.post_attention_norm(x), dtype).astype(x.dtype)
        return x, (k_all, v_all)

    if model.scan_layers:
        graphdef, stacked = nnx.split(model.blocks)

        def body(x, xs):
            layer_state, layer_keys, layer_values = xs
            return layer(x, nnx.merge(graphdef, layer_state), layer_keys, layer_values)

        x, (keys, values) = jax.lax.scan(body, x, (stacked, cache.keys, cache.values))
    else:
        keys, values = [], []
        for i, block in enumerate(model.layers):
            x, (k_all, v_all) = layer(x, block, cache.keys[i], cache.values[i])
            keys.append(k_all)
            values.append(v_all)
        keys, values = jnp.stack(keys), jnp.stack(values)
    return model.norm(x), Cache(keys, values, cache.valid)


def _sample(logits, key, temperature, top_k, top_p):
    """logits [B, V] float32 -> token ids [B]; greedy where temperature <= 0."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)  # [B, V] descending
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None]
    keep = jnp.where(top_k > 0, rank < top_k, True)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Nucleus: keep a token if the mass strictly before it is below top_p (the first always stays).
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)  # [B] index into `order`
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy)


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad_id after a row's EOS
    logprobs: jax.Array  # [B, N] float32 log-probability of each token under the raw logits
    lengths: jax.Array  # [B] int32 tokens generated, EOS included


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    key,
    temperature,
    top_k,
    top_p,
    eos_ids,
    pad_id,
    max_new_tokens,
):
    model = nnx.merge(graphdef, state)
    config = model.config
    b, p = prompt_ids.shape
    s = p + max_new_tokens
    cache_shape = (config.num_hidden_layers, b, s, config.num_key_value_heads, config.head_dim)
    valid = jnp.zeros((b, s), bool).at[:, :p].set(prompt_mask)
    cache = Cache(
        jnp.zeros(cache_shape, model.compute_dtype),
        jnp.zeros(cache_shape, model.compute_dtype),
        valid,
    )
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    hidden, cache = _cached_forward(model, cache, prompt_ids, positions, 0)
    logits = model.logits(hidden[:, -1:])[:, 0]  # [B, V]
    next_position = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # [B]

    class Carry(NamedTuple):
        step: jax.Array
        logits: jax.Array
        cache: Cache
        done: jax.Array
        tokens: jax.Array
        logprobs: jax.Array
        key: jax.Array

    def body(c: Carry) -> Carry:
        key, sub = jax.random.split(c.key)
        token = _sample(c.logits, sub, temperature, top_k, top_p).astype(jnp.int32)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(c.logits), token[:, None], axis=-1)[:, 0]
        token = jnp.where(c.done, pad_id, token)
        tokens = c.tokens.at[:, c.step].set(token)
        logprobs = c.logprobs.at[:, c.step].set(jnp.where(c.done, 0.0, logprob))
        done = c.done | jnp.any(token[:, None] == eos_ids[None], axis=-1)
        slot = p + c.step
        cache = c.cache._replace(valid=c.cache.valid.at[:, slot].set(True))
        hidden, cache = _cached_forward(
            model, cache, token[:, None], (next_position + c.step)[:, None], slot
        )
        return Carry(c.step + 1, model.logits(hidden)[:, 0], cache, done, tokens, logprobs, key)

    def cond(c: Carry):
        # The last decode writes slot P + N - 1; stop early once every row has hit EOS.
        return (c.step < max_new_tokens) & ~jnp.all(c.done)

    init = Carry(
        jnp.int32(0),
        logits,
        cache,
        jnp.zeros((b,), bool),
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b, max_new_tokens), jnp.float32),
        key,
    )
    out = jax.lax.while_loop(cond, body, init)
    is_eos = jnp.any(out.tokens[..., None] == eos_ids, axis=-1)  # [B, N]
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, out.step)
    return Generation(out.tokens, out.logprobs, first_eos.astype(jnp.int32))


def generate(
    model: Llama,
    prompt_ids,
    prompt_mask,
    key: jax.Array,
    *,
    max_new_tokens: int,
    eos_ids=(),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Generation:
    """Samples up to `max_new_tokens` per row, stopping each row at its first EOS.

    Args:
      model: a `Llama` (unrolled or scanned layers).
      prompt_ids: [B, P] int, LEFT-padded prompts; prompt_mask: [B, P] bool, True on real tokens.
      key: PRNG key; the same key gives the same samples.
      max_new_tokens: N, static (one compile per (B, P, N)).
      eos_ids: token ids that end a row; pad_id fills the row after it.
      temperature: 0 for greedy; top_k: keep the k most likely (0 = off); top_p: nucleus mass.
    Returns:
      Generation(tokens [B, N], logprobs [B, N], lengths [B]).
    """
    prompt_mask = jnp.asarray(prompt_mask, bool)
    if not bool(jnp.all(prompt_mask[:, -1])):
        raise ValueError(
            "prompts must be LEFT-padded: prompt_mask[:, -1] must be True on every row"
        )
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(list(eos_ids) if eos_ids else [-1], jnp.int32)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_ids, jnp.int32),
        prompt_mask,
        key,
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
        eos,
        jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
    )
