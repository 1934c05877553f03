"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE (llama3 scaling), GQA attention, SwiGLU.

The same modules run Qwen3 (per-head q/k RMSNorm before RoPE) and Gemma 3 text (interleaved
sliding-window and global layers with their own RoPE bases, q/k norms, four `1 + weight`
RMSNorms per block, GeGLU, embeddings scaled by sqrt(D), optional logit soft-capping), switched
by `LlamaConfig` fields, so LoRA, sharding rules, the fused head and generation see one model.

Dimension legend: B batch, L tokens, D model width, H query heads, K key/value heads, E head dim,
F MLP width, V vocabulary.

Sliding layers: a query at position i sees keys at positions i - W + 1 .. i (W =
`sliding_window`), as transformers' `sliding_window_overlay`. Under `scan_layers` every layer
runs the same body, so a per-layer flag picks the mask and the RoPE frequencies.

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`) so that one rules table maps it onto a mesh. The forward takes left-padded
prompts and right-padded responses: `positions` give each token's RoPE position and
`attention_mask` marks real tokens; attention is causal over real tokens only.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from rsa_jax.models._config import LlamaConfig
from rsa_jax.models._project import PROJECTIONS, project


def attention_implementation(choice: str, dtype, head_dim: int) -> Literal["xla", "cudnn"]:
    """The `jax.nn.dot_product_attention` implementation for `LlamaConfig.attention`.

    "auto" takes cuDNN flash attention where it applies (the default backend is a GPU, the
    compute dtype is bfloat16/float16, head_dim a multiple of 8 up to 128: cuDNN's fused kernel
    constraints) and XLA's softmax(QK^T)V everywhere else (CPU, TPU, float32). "xla" and "cudnn"
    force one; "cudnn" off a GPU fails inside jax with its own error. On cuDNN the padding mask
    becomes an additive bias, which the fused kernel supports.
    """
    if choice == "xla" or choice == "cudnn":
        return choice
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if jax.default_backend() == "gpu" and half and fits else "xla"


def _tokens(x: jax.Array) -> jax.Array:
    """[B, L, ...] -> [N, ...] with N = B L: every weight matmul sees one token axis.

    Why: with two token axes (b, l) the weight gradients contract over both, and XLA's CPU
    layout assignment then writes the activation gradients transposed first (copy fusions of
    [F, B L] per matmul, 15-20% of a SmolLM2-135M train step in `bench/profile_step.py`); with
    one token axis the same gradients are plain 2-D matmuls and those copies are gone. The
    reshape itself is free (contiguous axes)."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale=0.02) -> nnx.Param:
    value = scale * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + weight); offset 1 is Gemma's (its weights are stored around 0)."""

    def __init__(self, dim: int, eps: float, dtype, offset: float = 0.0, axis: str = "embed"):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype), logical_axes=(axis,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        # Normalise in float32 whatever the compute dtype (bf16 variance underflows).
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def rope_frequencies(config: LlamaConfig, local: bool = False) -> jax.Array:
    """[E/2] inverse frequencies, with the llama3 or linear scaling when configured.

    `local=True`: the sliding layers' frequencies (base `rope_local_theta` when set, unscaled,
    as Gemma 3; without `rope_local_theta` the global ones).
    """
    e = config.head_dim
    if local and config.rope_local_theta is not None:
        return 1.0 / (config.rope_local_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    if config.rope_linear_factor is not None:
        return inv / config.rope_linear_factor
    if config.rope_llama3 is None:
        return inv
    factor, low, high, original = config.rope_llama3
    wavelength = 2 * math.pi / inv
    low_wavelength, high_wavelength = original / low, original / high
    smooth = (original / wavelength - low) / (high - low)
    scaled = jnp.where(wavelength > low_wavelength, inv / factor, inv)
    mid = (wavelength <= low_wavelength) & (wavelength >= high_wavelength)
    return jnp.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def apply_rope(x, positions, inv_freq):
    """x [B, L, N, E] rotated by `positions` [B, L] (rotate-half convention, as in HF Llama)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, E/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]  # [B, L, 1, E]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def pick_layer_value(local, values):
    """values = (global, sliding): the sliding one where `local` (a Python bool, or a traced
    scalar under scan); the global one when there is no sliding value (None)."""
    global_value, local_value = values
    if local_value is None:
        return global_value
    if isinstance(local, bool):
        return local_value if local else global_value
    return jnp.where(local, local_value, global_value)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, dtype):
        d, h, k, e = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q = _param(rngs, (d, h, e), ("embed", "heads", "head_dim"), dtype)
        self.k = _param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = _param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), dtype)
        self.o = _param(rngs, (h, e, d), ("heads", "head_dim", "embed"), dtype)
        if config.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((h, e), dtype), logical_axes=("heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((k, e), dtype), logical_axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((k, e), dtype), logical_axes=("kv_heads", "head_dim"))
        if config.qk_norm:
            eps, offset = config.rms_norm_eps, config.norm_offset
            self.q_norm = RMSNorm(e, eps, dtype, offset, axis="head_dim")
            self.k_norm = RMSNorm(e, eps, dtype, offset, axis="head_dim")
        self.config = config

    def project(self, x, positions, inv_freq, compute_dtype):
        """Queries [B, L, H, E], keys and values [B, L, K, E] with RoPE applied."""
        b, length = x.shape[:2]
        flat = _tokens(x.astype(compute_dtype))  # [N, D]

        def heads(name, equation):  # [N, D] -> [B, L, heads, E]
            y = project(self, name, equation, flat, compute_dtype)
            return y.reshape(b, length, *y.shape[1:])

        q = heads("q", "nd,dhe->nhe")
        k = heads("k", "nd,dke->nke")
        v = heads("v", "nd,dke->nke")
        if self.config.attention_bias:
            q = q + self.q_bias[...].astype(compute_dtype)
            k = k + self.k_bias[...].astype(compute_dtype)
            v = v + self.v_bias[...].astype(compute_dtype)
        if self.config.qk_norm:  # per head, over E, before RoPE (Qwen3, Gemma 3)
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend(self, q, k, v, allowed, compute_dtype):
        """q [B, L, H, E], k/v [B, S, K, E], allowed [B, L, S] bool -> [B, L, D]."""
        b, length, h, e = q.shape
        c = self.config
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        q, k, v = (t.astype(compute_dtype) for t in (q, k, v))
        if c.attn_logit_softcapping is not None:
            # jax.nn.dot_product_attention has no soft-capping: the plain XLA form.
            out = _softcapped_attention(q, k, v, allowed, scale, c.attn_logit_softcapping)
        else:
            # One mask for every padding layout (left-padded prompts, right-padded responses, a
            # KV cache with S != L, a sliding window): `allowed` holds causality, the window and
            # the real keys.
            out = jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=allowed[:, None],  # [B, 1, L, S], broadcast over heads
                scale=scale,
                implementation=attention_implementation(c.attention, compute_dtype, e),
            )  # [B, L, H, E]
        y = project(self, "o", "nhe,hed->nd", _tokens(out), compute_dtype)  # [N, D]
        return y.reshape(b, length, y.shape[-1])


def _softcapped_attention(q, k, v, allowed, scale, cap):
    """softmax(cap tanh(scale q.k / cap)) v over allowed keys, in float32; GQA by grouping."""
    b, length, h, e = q.shape
    kv = k.shape[2]
    scale = e**-0.5 if scale is None else scale
    q = q.reshape(b, length, kv, h // kv, e)  # [B, L, K, G, E]
    scores = jnp.einsum("blkge,bske->bkgls", q, k, preferred_element_type=jnp.float32) * scale
    scores = cap * jnp.tanh(scores / cap)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bske->blkge", weights, v)
    return out.reshape(b, length, h, e)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, dtype):
        d, f = config.hidden_size, config.intermediate_size
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.hidden_act = config.hidden_act

    def __call__(self, x, compute_dtype):
        flat = _tokens(x.astype(compute_dtype))  # [N, D]
        gate = project(self, "gate", "nd,df->nf", flat, compute_dtype)
        up = project(self, "up", "nd,df->nf", flat, compute_dtype)
        if self.hidden_act == "silu":
            act = jax.nn.silu(gate)
        else:  # gelu_pytorch_tanh: the tanh approximation of GELU (GeGLU)
            act = jax.nn.gelu(gate, approximate=True)
        y = project(self, "down", "nf,fd->nd", act * up, compute_dtype)
        return y.reshape(x.shape[:-1] + y.shape[-1:])


class Block(nnx.Module):
    """Pre-norm block; with `sandwich_norms` (Gemma) also the attention and MLP outputs are
    normed before their residual adds (`post_attention_norm`, `post_feedforward_norm`) and the
    MLP input goes through `pre_feedforward_norm`; otherwise `post_attention_norm` is the MLP's
    input norm (Hugging Face's `post_attention_layernorm` in both cases)."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, dtype):
        d, eps, offset = config.hidden_size, config.rms_norm_eps, config.norm_offset
        self.input_norm = RMSNorm(d, eps, dtype, offset)
        self.attention = Attention(config, rngs, dtype)
        self.post_attention_norm = RMSNorm(d, eps, dtype, offset)
        if config.sandwich_norms:
            self.pre_feedforward_norm = RMSNorm(d, eps, dtype, offset)
            self.post_feedforward_norm = RMSNorm(d, eps, dtype, offset)
        self.mlp = MLP(config, rngs, dtype)
        self.sandwich = config.sandwich_norms

    def qkv(self, x, positions, inv_freq, compute_dtype):
        """The attention's queries, keys and values of the block input x [B, L, D]."""
        return self.attention.project(self.input_norm(x), positions, inv_freq, compute_dtype)

    def finish(self, x, q, k, v, allowed, compute_dtype):
        """Attention over keys/values k, v [B, S, K, E] and the MLP, with both residuals."""
        attended = self.attention.attend(q, k, v, allowed, compute_dtype)
        if self.sandwich:
            x = x + self.post_attention_norm(attended).astype(x.dtype)
            y = self.mlp(self.pre_feedforward_norm(x), compute_dtype)
            return x + self.post_feedforward_norm(y).astype(x.dtype)
        x = x + attended.astype(x.dtype)
        return x + self.mlp(self.post_attention_norm(x), compute_dtype).astype(x.dtype)

    def __call__(self, x, positions, allowed, inv_freq, compute_dtype):
        q, k, v = self.qkv(x, positions, inv_freq, compute_dtype)
        return self.finish(x, q, k, v, allowed, compute_dtype)


def attention_allowed(attention_mask: jax.Array) -> jax.Array:
    """[B, L] real-token mask -> [B, L, L]: causal, real keys only (queries on padding see none)."""
    length = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & attention_mask[:, None, :] & attention_mask[:, :, None]


def window_allowed(allowed: jax.Array, query_pos, key_pos, window: int) -> jax.Array:
    """`allowed` [B, L, S] restricted to keys less than `window` positions behind the query.

    query_pos [B, L] / key_pos [B, S] (or unbatched [L] / [S]) are positions along one row, so
    that the key at query_pos - window + 1 is the oldest one seen (transformers'
    `kv_idx > q_idx - sliding_window`).
    """
    query_pos, key_pos = jnp.asarray(query_pos), jnp.asarray(key_pos)
    distance = query_pos[..., :, None] - key_pos[..., None, :]  # [(B,) L, S]
    return allowed & (distance < window)


REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_policy(remat: bool | str | None):
    """False/None/"none": no remat; True/"full": full; else a name from REMAT_POLICIES."""
    if remat in (False, None, "none"):
        return False, None
    if remat is True:
        return True, None
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of none, full, {', '.join(REMAT_POLICIES)}")
    return True, REMAT_POLICIES[remat]


class Llama(nnx.Module):
    """The decoder. `model(input_ids, positions, attention_mask) -> hidden [B, L, D]`.

    Options: `param_dtype` (storage) and `compute_dtype` (activations, matmuls); `remat` per
    block (False, True/"full", "dots", "dots_no_batch"); `scan_layers` stacks the blocks under
    `blocks` with a leading `layers` axis and runs them with one compiled `lax.scan` body
    (otherwise `layers` is a list of blocks, unrolled); `constrain(x, logical_axes) -> x` is
    applied to the activations at every block boundary with axes ("batch", "length", "embed")
    (e.g. a `with_sharding_constraint` through the mesh rules).
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
        remat: bool | str = False,
        scan_layers: bool = False,
        constrain=None,
    ):
        self.config = config
        self.compute_dtype = compute_dtype
        self.remat = remat
        self.scan_layers = scan_layers
        self.constrain = constrain
        _remat_policy(remat)  # validate early
        v, d = config.vocab_size, config.hidden_size
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), param_dtype)
        if scan_layers:

            @nnx.split_rngs(splits=config.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return Block(config, rngs, param_dtype)

            self.blocks = stacked(rngs)
            for _, var in nnx.to_flat_state(nnx.state(self.blocks, nnx.Param)):
                var.set_metadata("logical_axes", ("layers", *var.get_metadata()["logical_axes"]))
        else:
            self.layers = nnx.List(
                [Block(config, rngs, param_dtype) for _ in range(config.num_hidden_layers)]
            )
        self.norm = RMSNorm(d, config.rms_norm_eps, param_dtype, config.norm_offset)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), param_dtype)

    def _boundary(self, x):
        return x if self.constrain is None else self.constrain(x, ("batch", "length", "embed"))

    def embed_tokens(self, input_ids) -> jax.Array:
        """[B, L] ids -> [B, L, D] embeddings in the compute dtype (times sqrt(D) for Gemma)."""
        x = jnp.take(self.embed[...], input_ids, axis=0)
        if self.config.embed_scale:  # the scale in the weights' dtype, as transformers
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
        return x.astype(self.compute_dtype)

    def layer_inputs(self, allowed, query_pos, key_pos):
        """(global and sliding masks, global and sliding RoPE frequencies, per-layer flags).

        The flags are a tuple of Python bools for unrolled layers and a [layers] bool array
        for the scan; sliding values are None on models without sliding layers.
        """
        config = self.config
        flags = config.sliding_layers()
        inv_freq = rope_frequencies(config)
        if not any(flags):
            return (allowed, None), (inv_freq, None), (False,) * len(flags)
        assert config.sliding_window is not None  # LlamaConfig checks it with sliding layers
        local_allowed = window_allowed(allowed, query_pos, key_pos, config.sliding_window)
        local_freq = rope_frequencies(config, local=True)
        return (allowed, local_allowed), (inv_freq, local_freq), flags

    def __call__(self, input_ids, positions, attention_mask):
        """input_ids, positions [B, L] int; attention_mask [B, L] bool -> final hidden [B, L, D]."""
        masks, freqs, flags = self.layer_inputs(
            attention_allowed(attention_mask), positions, positions
        )
        x = self._boundary(self.embed_tokens(input_ids))
        use_remat, policy = _remat_policy(self.remat)

        def run(block, x, local):
            allowed = pick_layer_value(local, masks)
            inv_freq = pick_layer_value(local, freqs)
            out = block(x, positions, allowed, inv_freq, self.compute_dtype)
            return self._boundary(out)

        if self.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)

            def body(x, xs):
                layer_state, local = xs
                return run(nnx.merge(graphdef, layer_state), x, local), None

            if use_remat:
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            x, _ = jax.lax.scan(body, x, (stacked, jnp.asarray(flags, bool)))
        else:
            for block, local in zip(self.layers, flags, strict=True):
                if use_remat:
                    x = nnx.remat(run, policy=policy, static_argnums=(2,))(block, x, local)
                else:
                    x = run(block, x, local)
        return self.norm(x)

    def unembedding(self) -> jax.Array:
        """[D, V]: the transposed embedding for tied models, the LM head otherwise."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, V] float32 (any leading axes: [..., D] -> [..., V])."""
        w = self.unembedding().astype(hidden.dtype)
        # Tokens flattened as in the blocks (see `_tokens`): the head's weight gradient is the
        # largest of them (V x D from [N, V] logits' gradients).
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = jnp.einsum("nd,dv->nv", flat, w, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits.reshape(hidden.shape[:-1] + logits.shape[-1:])


# Parameters every forward pass casts to the compute dtype before it reads them: the weights of
# `project` (their only use is `dense_weight(w, compute_dtype)`), the attention biases and the LM
# head (`logits` casts it to the hidden states' dtype, the compute dtype). The embedding joins
# them unless it is scaled in its own dtype first (`embed_scale`, Gemma); norm weights are read
# in float32 and never cast down.
_CAST_AT_USE = frozenset((*PROJECTIONS, "q_bias", "k_bias", "v_bias", "lm_head"))


def cast_at_use(path, config: LlamaConfig) -> bool:
    """Whether the parameter at `path` (the tuple of an NNX state path, or a flat key
    "blocks/attention/q") is cast to the compute dtype wherever the model reads it, so storing
    it in that dtype changes no result."""
    name = path.rsplit("/", 1)[-1] if isinstance(path, str) else str(path[-1])
    if name == "embed":
        return not config.embed_scale
    return name in _CAST_AT_USE


def store_in_compute_dtype(model: Llama) -> Llama:
    """Stores, in place, the parameters the model casts to its compute dtype at every use
    (`cast_at_use`) in that dtype: the same outputs bit for bit, half the bytes for a bfloat16
    model with float32 parameters, and no hoisted copy. XLA moves a scanned model's casts out of
    the sampler's loops (a converted copy of every layer's weights, once for the prefill and
    once for the decode loop): for Llama-3-70B in bfloat16 on a v5p-8, 100 GiB of temporaries
    per chip beside 66 GiB of float32 parameters, 5 GiB with the weights already in bfloat16
    (docs/compile.md). For evaluation, never for training (the optimizer updates float32).

    Leaves that are not floating arrays (quantized `qwix.QArray` codes) or already narrower are
    kept; each leaf is cast and replaced on its own shardings, so the float32 copy of one leaf
    at a time is what the cast adds at its peak."""
    dtype = jnp.dtype(model.compute_dtype)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        if not isinstance(value, jax.Array) or not cast_at_use(path, model.config):
            continue
        if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype.itemsize > dtype.itemsize:
            var.set_value(value.astype(dtype))
    return model
