"""Jitted batched sampling from the NNX Llama with a fixed-shape KV cache.

Dimension legend: B batch, P prompt slots, N new tokens, S = P + N cache slots, K key/value
heads, E head dim, V vocabulary.

Prompts come LEFT-padded (as the data pipeline lays them out), so every row's last prompt token
sits in slot P - 1 and generated token i goes to slot P + i for all rows. The prompt is prefilled
in one forward; then a `lax.while_loop` decodes one token per step, attending over the cache
slots written so far that hold real tokens. Shapes depend only on (B, P, N): one compile per
bucket. Temperature, top-k and top-p are traced, so changing them does not recompile.

Randomness is per row: row b draws its token at step i with `fold_in(row_keys[b], i)`, so a
row's sample depends on its own key only, never on which other rows share its batch or how the
batch is split over devices (the eval driver gives row r the key `fold_in(key(seed), r)`, which
makes its samples independent of the batch size and of the mesh).

Sharded runs: parameters keep the shardings they come with (e.g. the training mesh's); with
`shardings` given, the rows (prompts, keys, outputs) are split over the mesh's batch axes and the
KV cache is pinned to `shardings.cache` ([layers, B, S, K, E]: rows over the batch axes, K over
the tensor axis), so XLA never gathers the cache onto one device.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from rsa_jax.models import Llama, pick_layer_value


class Shardings(NamedTuple):
    """Where `generate` puts its row-major arrays and the KV cache (hashable: a static argument).

    rows: [B, ...] arrays (prompts, row keys, tokens, log-probs), split on their first axis.
    cache: the [layers, B, S, K, E] keys and values.
    """

    rows: NamedSharding
    cache: NamedSharding


class Cache(NamedTuple):
    keys: jax.Array  # [layers, B, S, K, E]
    values: jax.Array  # [layers, B, S, K, E]
    valid: jax.Array  # [B, S] bool: slot holds a real token


def _cached_forward(model: Llama, cache: Cache, ids, positions, start):
    """Runs `ids` [B, T] at cache slots [start, start + T); returns (hidden [B, T, D], cache).

    `cache.valid` must already mark the new slots. Query slot start + i attends to the valid
    slots up to and including itself; on sliding layers (Gemma 3, Mistral, ...) only to the last
    `sliding_window` of them. Real tokens fill consecutive slots (left-padded prompt, then one
    token per step), so slot distance is position distance and the cache stays full-length for
    every layer: the window is a mask over it, not a ring buffer.
    """
    dtype = model.compute_dtype
    t, s = ids.shape[1], cache.valid.shape[1]
    query_slot = start + jnp.arange(t)  # [T]
    allowed = (jnp.arange(s)[None, :] <= query_slot[:, None])[None] & cache.valid[:, None, :]
    masks, freqs, flags = model.layer_inputs(allowed, query_slot, jnp.arange(s))
    x = model.embed_tokens(ids)  # [B, T, D]

    def layer(x, block, local, layer_keys, layer_values):
        allowed = pick_layer_value(local, masks)
        inv_freq = pick_layer_value(local, freqs)
        q, k, v = block.qkv(x, positions, inv_freq, dtype)
        k_all = jax.lax.dynamic_update_slice_in_dim(layer_keys, k.astype(dtype), start, 1)
        v_all = jax.lax.dynamic_update_slice_in_dim(layer_values, v.astype(dtype), start, 1)
        x = block.finish(x, q, k_all, v_all, allowed, dtype)
        return x, (k_all, v_all)

    if model.scan_layers:
        graphdef, stacked = nnx.split(model.blocks)

        def body(x, xs):
            layer_state, local, layer_keys, layer_values = xs
            return layer(x, nnx.merge(graphdef, layer_state), local, layer_keys, layer_values)

        xs = (stacked, jnp.asarray(flags, bool), cache.keys, cache.values)
        x, (keys, values) = jax.lax.scan(body, x, xs)
    else:
        keys, values = [], []
        for i, (block, local) in enumerate(zip(model.layers, flags, strict=True)):
            x, (k_all, v_all) = layer(x, block, local, cache.keys[i], cache.values[i])
            keys.append(k_all)
            values.append(v_all)
        keys, values = jnp.stack(keys), jnp.stack(values)
    return model.norm(x), Cache(keys, values, cache.valid)


def _sample(logits, keys, temperature, top_k, top_p):
    """logits [B, V] float32, keys [B] (one per row) -> ids [B]; greedy at temperature <= 0."""
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
    # One draw per row from the row's own key: the result does not depend on the batch layout.
    choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)  # [B] index into `order`
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy)


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad_id after a row's EOS
    logprobs: jax.Array  # [B, N] float32 log-probability of each token under the raw logits
    lengths: jax.Array  # [B] int32 tokens generated, EOS included


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "shardings"))
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    key,
    row_ids,
    temperature,
    top_k,
    top_p,
    eos_ids,
    pad_id,
    max_new_tokens,
    shardings,
):
    model = nnx.merge(graphdef, state)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)  # [B]
    rows = None if shardings is None else shardings.rows
    cache_sharding = None if shardings is None else shardings.cache
    config = model.config
    b, p = prompt_ids.shape
    s = p + max_new_tokens
    cache_shape = (config.num_hidden_layers, b, s, config.num_key_value_heads, config.head_dim)
    valid = _constrain(jnp.zeros((b, s), bool).at[:, :p].set(prompt_mask), rows)

    def pin(cache: Cache) -> Cache:
        keys, values = (_constrain(x, cache_sharding) for x in (cache.keys, cache.values))
        return Cache(keys, values, _constrain(cache.valid, rows))

    zeros = jnp.zeros(cache_shape, model.compute_dtype)
    cache = pin(Cache(zeros, zeros, valid))
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    hidden, cache = _cached_forward(model, cache, prompt_ids, positions, 0)
    cache = pin(cache)
    logits = _constrain(model.logits(hidden[:, -1:])[:, 0], rows)  # [B, V]
    next_position = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # [B]

    class Carry(NamedTuple):
        step: jax.Array
        logits: jax.Array
        cache: Cache
        done: jax.Array
        tokens: jax.Array
        logprobs: jax.Array

    def body(c: Carry) -> Carry:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, c.step)  # [B]
        token = _sample(c.logits, step_keys, temperature, top_k, top_p).astype(jnp.int32)
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
        logits = _constrain(model.logits(hidden)[:, 0], rows)
        return Carry(c.step + 1, logits, pin(cache), done, tokens, logprobs)

    def cond(c: Carry):
        # The last decode writes slot P + N - 1; stop early once every row has hit EOS.
        return (c.step < max_new_tokens) & ~jnp.all(c.done)

    init = Carry(
        jnp.int32(0),
        logits,
        cache,
        _constrain(jnp.zeros((b,), bool), rows),
        _constrain(jnp.full((b, max_new_tokens), pad_id, jnp.int32), rows),
        _constrain(jnp.zeros((b, max_new_tokens), jnp.float32), rows),
    )
    out = jax.lax.while_loop(cond, body, init)
    is_eos = jnp.any(out.tokens[..., None] == eos_ids, axis=-1)  # [B, N]
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, out.step)
    return Generation(out.tokens, out.logprobs, first_eos.astype(jnp.int32))


def place_rows(x, sharding: NamedSharding | None) -> jax.Array:
    """A host array [B, ...] as a global array split by `sharding` (None: the default device).

    Every process passes the same global `x`; each one copies only the rows of its own devices
    (`make_array_from_callback`), so this also works when the mesh spans several processes.
    """
    x = np.asarray(x)
    if sharding is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def generate_call(
    graphdef,
    state,
    *,
    rows: int,
    prompt_len: int,
    max_new_tokens: int,
    eos_count: int = 1,
    shardings: Shardings | None = None,
):
    """The jitted sampler and the arguments `generate` passes it for a batch of `rows` prompts
    of `prompt_len` slots, from shapes only: `(fn, args, static)` with `fn.lower(*args,
    **static)` the program `generate` runs (`rsa-jax compile` lowers it for a TPU slice).

    Args:
      graphdef, state: `nnx.split(model)`; `state` may hold `jax.ShapeDtypeStruct`s (with
        their shardings), so no weight is read or allocated.
      rows: B; prompt_len: P; max_new_tokens: N; eos_count: how many EOS ids are given.
      shardings: as in `generate` (None: no constraint, one device).
    Returns:
      (`_generate`, its traced arguments as ShapeDtypeStructs, its static arguments).
    """
    row_sharding = None if shardings is None else shardings.rows
    # The key and the scalars are uncommitted in `generate`: no sharding, jit places them.
    replicated = None

    def arg(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        graphdef,
        state,
        arg((rows, prompt_len), jnp.int32, row_sharding),
        arg((rows, prompt_len), jnp.bool_, row_sharding),
        arg(key.shape, key.dtype, replicated),
        arg((rows,), jnp.int32, row_sharding),
        arg((), jnp.float32, replicated),
        arg((), jnp.int32, replicated),
        arg((), jnp.float32, replicated),
        arg((max(1, eos_count),), jnp.int32, replicated),
        arg((), jnp.int32, replicated),
    )
    return _generate, args, {"max_new_tokens": max_new_tokens, "shardings": shardings}


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
    row_ids=None,
    shardings: Shardings | None = None,
) -> Generation:
    """Samples up to `max_new_tokens` per row, stopping each row at its first EOS.

    Args:
      model: a `Llama` (unrolled or scanned layers), its parameters on any devices or mesh.
      prompt_ids: [B, P] int, LEFT-padded prompts; prompt_mask: [B, P] bool, True on real tokens.
      key: PRNG key; row b samples with `fold_in(key, row_ids[b])`, so the same key and row id
        give the same sample whatever else is in the batch.
      max_new_tokens: N, static (one compile per (B, P, N)).
      eos_ids: token ids that end a row; pad_id fills the row after it.
      temperature: 0 for greedy; top_k: keep the k most likely (0 = off); top_p: nucleus mass.
      row_ids: [B] int, each row's id for its key (default 0..B-1).
      shardings: where rows and the KV cache go on the parameters' mesh (None: no constraint);
        B must then be a multiple of the number of row shards.
    Returns:
      Generation(tokens [B, N], logprobs [B, N], lengths [B]), split like `shardings.rows`.
    """
    prompt_mask = np.asarray(prompt_mask, bool)
    if not prompt_mask[:, -1].all():
        raise ValueError(
            "prompts must be LEFT-padded: prompt_mask[:, -1] must be True on every row"
        )
    b = prompt_mask.shape[0]
    row_ids = np.arange(b, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32)
    if row_ids.shape != (b,):
        raise ValueError(f"row_ids has shape {row_ids.shape}, expected ({b},)")
    rows = None if shardings is None else shardings.rows
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(list(eos_ids) if eos_ids else [-1], jnp.int32)
    return _generate(
        graphdef,
        state,
        place_rows(np.asarray(prompt_ids, np.int32), rows),
        place_rows(prompt_mask, rows),
        key,
        place_rows(row_ids, rows),
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
        eos,
        jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
        shardings=shardings,
    )
