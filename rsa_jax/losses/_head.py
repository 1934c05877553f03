"""Public entry points: a pair loss from logits, or fused with the unembedding, chunk by chunk.

Dimension legend: B pairs, N = 2B sequences (rows [0, B) chosen, [B, 2B) rejected), T tokens,
V vocabulary, D model width, C token chunk, K = ceil(T / C) chunks.

`logits_pair_loss` takes the [N, T, V] logits of both models: simple, but the logits (and their
softmax, log-ratio, ...) are O(N T V) floats. `fused_pair_loss` takes the final hidden states
[N, T, D] and the unembedding matrices [D, V] instead and forms the logits of C tokens at a time
inside a `lax.scan`, rematerialised in the backward pass (all but the last chunk's, which the
backward pass starts with), so at most O(N C V) of them are alive.
Both return the same `(losses [B], metrics)`; the per-pair loss functions are `LOSSES[name]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from rsa_jax.losses._kernel import DEFAULT_CHUNK_SIZE, DEFAULTS, Kernel, check_mu
from rsa_jax.losses._preference import LOSSES, Metrics
from rsa_jax.losses._risk import quantile_tail
from rsa_jax.losses._row_blocks import (
    block_rows,
    blocked_token_stats,
    rows_backward,
    rows_forward,
)
from rsa_jax.losses._token_stats import TokenStats, sequence_stats

_KERNEL = Kernel()  # the default kernel choice


def _is_concrete(x) -> bool:
    return not isinstance(x, Tracer)


def _check_common(labels, loss_mask, *, loss, risk, mu, version, where: str) -> None:
    """Eager checks shared by both entry points (cheap; value checks only on concrete inputs)."""
    try:
        Kernel(loss=loss, risk=risk, version=version)
        if _is_concrete(mu) and np.ndim(mu) == 0:
            check_mu(risk, mu)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if loss_mask.dtype != jnp.bool_:
        raise TypeError(f"{where}: loss_mask must be boolean, got dtype {loss_mask.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{where}: labels must be integer token ids, got dtype {labels.dtype}")
    if labels.shape != loss_mask.shape or labels.ndim != 2:
        raise ValueError(
            f"{where}: labels {labels.shape} and loss_mask {loss_mask.shape} must both be [2B, T]"
        )
    if labels.shape[0] % 2:
        raise ValueError(
            f"{where}: the batch axis holds chosen rows then rejected rows, so it must be even; "
            f"got {labels.shape[0]}"
        )


def _check_finite(where: str, **arrays) -> None:
    for name, x in arrays.items():
        # NumPy on purpose: jnp would stage the check into an enclosing trace.
        if _is_concrete(x) and not np.isfinite(np.asarray(x, np.float32)).all():
            raise ValueError(f"{where}: {name} contains NaN or inf")


def _pair_loss(stats: TokenStats, loss_mask, *, loss, gamma, beta, alpha, version):
    """Sequence sums, then the chosen/rejected split and the pair loss."""
    seq = sequence_stats(stats, loss_mask, gamma)  # each [N]
    b = loss_mask.shape[0] // 2
    chosen = jax.tree.map(lambda x: x[:b], seq)
    rejected = jax.tree.map(lambda x: x[b:], seq)
    return LOSSES[loss](chosen, rejected, beta=beta, alpha=alpha, version=version)


def _resolve_tail(mu, tail):
    return quantile_tail(mu) if tail is None else jnp.asarray(tail, jnp.float32)


def logits_pair_loss(
    policy_logits: jax.Array,
    ref_logits: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    *,
    loss: str = _KERNEL.loss,
    risk: str = _KERNEL.risk,
    beta=DEFAULTS.beta,
    alpha=DEFAULTS.alpha,
    mu=DEFAULTS.mu,
    gamma=DEFAULTS.gamma,
    version: int = _KERNEL.version,
    split_vocab: bool = _KERNEL.split_vocab,
    tail=None,
    row_shards: int = 1,
) -> tuple[jax.Array, Metrics]:
    """Per-pair loss and metrics from the logits of the policy and the frozen reference.

    Args:
      policy_logits: [2B, T, V] (bf16 or f32; reductions run in f32).
      ref_logits: [2B, T, V]; no gradient flows into them.
      labels: [2B, T] int next-token ids; loss_mask: [2B, T] bool, True on response labels.
      loss: key of `LOSSES` ("dpo", "tdpo", "ra_dpo"); risk: key of `RISKS`. Both static.
      beta, alpha, mu, gamma: traced hyperparameters (no recompilation, vmappable).
      version: static 1 or 2. split_vocab: static, `cvar_reference` only.
      tail: optional traced float32 `1 - mu` (defaults to `quantile_tail(mu)`).
      row_shards: static, how many devices the 2B rows are split over (the train step's batch
        sharding; 1 on one device). The risk head's row-block loops then step over each
        device's own rows; it changes no value, only which rows a loop step takes.

    Returns:
      (losses [B], metrics: TRL-named dict of [B] arrays).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> pl, rl = jax.random.normal(jax.random.key(0), (2, 4, 3, 16))  # [2B, T, V], B = 2
      >>> labels, mask = jnp.ones((4, 3), jnp.int32), jnp.ones((4, 3), bool)
      >>> kw = dict(loss="ra_dpo", risk="erm", mu=2.0)
      >>> losses, metrics = logits_pair_loss(pl, rl, labels, mask, **kw)
      >>> losses.shape, metrics["rewards/margins"].shape
      ((2,), (2,))
      >>> loss = losses.mean()  # the reduction belongs to the train step
    """
    where = "logits_pair_loss"
    _check_common(labels, loss_mask, loss=loss, risk=risk, mu=mu, version=version, where=where)
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"{where}: policy_logits {policy_logits.shape} and ref_logits {ref_logits.shape} "
            f"must both be [2B, T, V] matching labels {labels.shape}"
        )
    _check_finite(where, policy_logits=policy_logits, ref_logits=ref_logits)
    # A few rows at a time (see `blocked_token_stats`): the same statistics as `token_stats`
    # without [2B, T, V] temporaries.
    stats = blocked_token_stats(
        policy_logits,
        ref_logits,
        labels,
        risk=risk,
        mu=mu,
        tail=_resolve_tail(mu, tail),
        split_vocab=split_vocab,
        shards=_row_shards(labels.shape[0], row_shards),
    )  # each [2B, T]
    return _pair_loss(
        stats, loss_mask, loss=loss, gamma=gamma, beta=beta, alpha=alpha, version=version
    )


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[N, T, ...] -> [K, N, C, ...], padding T with zeros up to a multiple of C."""
    n, t = x.shape[:2]
    k = -(-t // chunk)
    x = jnp.pad(x, [(0, 0), (0, k * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((n, k, chunk) + x.shape[2:])  # [N, K, C, ...]
    return jnp.moveaxis(x, 1, 0)  # [K, N, C, ...]


def _chunk_logits(h_policy, w_policy, h_ref, w_ref):
    """[N, C, D] x [D, V] -> [N, C, V] float32 logits of both models."""
    # f32 accumulation of the head matmul whatever the activation dtype.
    policy = jnp.einsum("ncd,dv->ncv", h_policy, w_policy, preferred_element_type=jnp.float32)
    ref = jnp.einsum("ncd,dv->ncv", h_ref, w_ref, preferred_element_type=jnp.float32)
    return policy, ref


def _rows(x: jax.Array, shards: int) -> jax.Array:
    """[N, C, ...] -> the [G, S, ...] row-block view of `rows_forward` (a free reshape); the N
    rows are split over `shards` devices, each holding whole rows (`block_rows`)."""
    n = x.shape[0] * x.shape[1]
    g = block_rows(n, shards=shards)
    return x.reshape(g, n // g, *x.shape[2:])


def _row_shards(rows: int, shards: int) -> int:
    """`shards` when it divides the rows (each device then holds whole rows), else 1."""
    return shards if rows % shards == 0 else 1


def _stats_of_logits(policy_logits, ref_logits, y, mu, tail, risk, split_vocab, shards):
    """A chunk's statistics ([N, C] each) and `rows_forward`'s per-row saved scalars."""
    rows = functools.partial(_rows, shards=shards)
    stats, saved = rows_forward(
        rows(policy_logits),
        rows(ref_logits),
        rows(y),
        mu,
        tail,
        risk=risk,
        split_vocab=split_vocab,
        shards=shards,
    )
    return jax.tree.map(lambda x: x.reshape(y.shape), stats), saved


def _chunk_backward(
    policy_logits,
    ref_logits,
    h_policy,
    w_policy,
    y,
    mu,
    tail,
    saved,
    cotangent,
    *,
    risk,
    split_vocab,
    shards,
):
    """One chunk's gradients (d_hidden [N, C, D], d_unembed [D, V], d_mu) from its logits of both
    models, the forward's saved scalars and the statistics' cotangent."""
    rows = functools.partial(_rows, shards=shards)
    d_logits, d_mu, _ = rows_backward(
        rows(policy_logits),
        rows(ref_logits),
        rows(y),
        mu,
        tail,
        saved,
        jax.tree.map(rows, cotangent),
        risk=risk,
        split_vocab=split_vocab,
    )
    # The transposes of the head matmul, accumulated in f32 like the forward's.
    d_logits = d_logits.reshape(policy_logits.shape).astype(h_policy.dtype)  # [N, C, V]
    d_hidden = jnp.einsum("ncv,dv->ncd", d_logits, w_policy, preferred_element_type=jnp.float32)
    d_unembed = jnp.einsum("ncd,ncv->dv", h_policy, d_logits, preferred_element_type=jnp.float32)
    return d_hidden, d_unembed, d_mu


# Rematerialised by hand, one custom VJP over all K chunks. The forward pass keeps each chunk's
# inputs and per-position scalars (the risk thresholds and both log-softmaxes' shift and log-sum,
# [N, C, H + 4] floats), and the last chunk's logits of both models. The backward pass starts with
# that last chunk, whose logits it would otherwise recompute right after the forward pass made
# them, then walks the other chunks in reverse, recomputing their [N, C, V] logits (the gradient
# needs p, q and the risk's mask at every entry) but not the selection behind the thresholds. The
# unembedding's gradient is summed in the loop's carry, starting from the last chunk's (no zeroed
# [D, V] buffer), which also makes the loop wait for the last chunk: left to itself, XLA ran the
# loop while the last chunk's [N, C, V] gradient waited for its matmuls (one more chunk-sized
# array at the peak). Between the matmuls, the statistics and their gradient go through
# `rows_forward`/`rows_backward` a few rows at a time, so a chunk's logits are the only [N, C, V]
# arrays (plus the gradient with respect to them). (jax.checkpoint with a names policy saving the
# thresholds made XLA keep O(N T V) selection buffers; plain jax.checkpoint redoes the selection.)
# The peak is then that of recomputing every chunk (XLA's buffers at K >= 3), except at K = 2,
# where the backward pass's one-step loop is inlined and XLA schedules chunk 0's recomputation
# first of all, before the forward loop: both chunks' logits are then alive at once, as on the
# logits path (an ordering XLA chose; `optimization_barrier`s in the loop did not change it).
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _fused_stats(h_policy, w_policy, h_ref, w_ref, y, mu, tail, risk, split_vocab, shards):
    args = (h_policy, w_policy, h_ref, w_ref, y, mu, tail, risk, split_vocab, shards)
    return _fused_stats_fwd(*args)[0]


def _fused_stats_fwd(h_policy, w_policy, h_ref, w_ref, y, mu, tail, risk, split_vocab, shards):
    """Chunked inputs ([K, N, C, D] hidden states, [K, N, C] labels) -> TokenStats of [K, N, C]."""

    def body(_, xs):
        h_p, h_r, y = xs
        logits = _chunk_logits(h_p, w_policy, h_r, w_ref)
        stats, saved = _stats_of_logits(*logits, y, mu, tail, risk, split_vocab, shards)
        # Each step's logits replace the previous step's in the carry (in place: nothing reads
        # those), so after the loop it holds the last chunk's. (Computing the last chunk after
        # the loop instead joins its statistics to the loop's with a concatenation, and XLA then
        # summed them over tokens in another order in plain and vmapped programs.)
        return logits, (stats, saved)

    _, n, c = y.shape
    empty = jnp.zeros((n, c, w_policy.shape[-1]), jnp.float32)
    kept, (stats, saved) = jax.lax.scan(body, (empty, empty), (h_policy, h_ref, y))
    return stats, (h_policy, w_policy, h_ref, w_ref, y, mu, tail, saved, kept)


def _fused_stats_bwd(risk, split_vocab, shards, residuals, cotangents):
    h_policy, w_policy, h_ref, w_ref, y, mu, tail, saved, (policy_last, ref_last) = residuals
    backward = functools.partial(_chunk_backward, risk=risk, split_vocab=split_vocab, shards=shards)
    at = functools.partial(jax.tree.map, lambda x: x[-1])
    d_hidden, d_unembed, d_mu = backward(
        policy_last, ref_last, h_policy[-1], w_policy, y[-1], mu, tail, at(saved), at(cotangents)
    )
    d_hidden = d_hidden[None]
    if h_policy.shape[0] > 1:

        def body(carry, xs):
            d_unembed, d_mu = carry
            h_p, h_r, y, saved, cotangent = xs
            policy_logits, ref_logits = _chunk_logits(h_p, w_policy, h_r, w_ref)
            d_h, d_w, d_m = backward(
                policy_logits, ref_logits, h_p, w_policy, y, mu, tail, saved, cotangent
            )
            return (d_unembed + d_w, d_mu + d_m), d_h

        firsts = jax.tree.map(lambda x: x[:-1], (h_policy, h_ref, y, saved, cotangents))
        (d_unembed, d_mu), d_first = jax.lax.scan(body, (d_unembed, d_mu), firsts, reverse=True)
        d_hidden = jnp.concatenate([d_first, d_hidden])
    # The reference gets no gradient; integer labels get float0 zeros. mu gets the same gradient
    # as on the logits path (the thresholds carry none there either), tail none.
    return (
        d_hidden.astype(h_policy.dtype),
        d_unembed.astype(w_policy.dtype),
        jnp.zeros_like(h_ref),
        jnp.zeros_like(w_ref),
        np.zeros(y.shape, jax.dtypes.float0),
        d_mu,
        jnp.zeros_like(tail),
    )


_fused_stats.defvjp(_fused_stats_fwd, _fused_stats_bwd)


def fused_token_stats(
    policy_hidden,
    policy_unembed,
    ref_hidden,
    ref_unembed,
    labels,
    *,
    risk,
    mu,
    tail,
    split_vocab,
    chunk_size,
    row_shards=1,
) -> TokenStats:
    """`token_stats` of `hidden @ unembed` for both models, C tokens at a time.

    Args:
      policy_hidden, ref_hidden: [N, T, D]; policy_unembed, ref_unembed: [D, V]; labels: [N, T].
      row_shards: static, the devices the N rows are split over (`fused_pair_loss`).
    Returns:
      TokenStats of [N, T] float32 arrays.
    """
    n, t, _ = policy_hidden.shape
    stats = _fused_stats(
        _to_chunks(policy_hidden, chunk_size),  # [K, N, C, D]
        policy_unembed,
        _to_chunks(jax.lax.stop_gradient(ref_hidden), chunk_size),  # [K, N, C, D]
        jax.lax.stop_gradient(ref_unembed),
        _to_chunks(labels, chunk_size),  # [K, N, C]
        jnp.asarray(mu, jnp.float32),
        jnp.asarray(tail, jnp.float32),
        risk,
        split_vocab,
        _row_shards(n, row_shards),  # resolved once: every chunk has the same N rows
    )  # TokenStats of [K, N, C]
    return jax.tree.map(lambda s: jnp.moveaxis(s, 0, 1).reshape(n, -1)[:, :t], stats)


def fused_pair_loss(
    policy_hidden: jax.Array,
    policy_unembed: jax.Array,
    ref_hidden: jax.Array,
    ref_unembed: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    *,
    loss: str = _KERNEL.loss,
    risk: str = _KERNEL.risk,
    beta=DEFAULTS.beta,
    alpha=DEFAULTS.alpha,
    mu=DEFAULTS.mu,
    gamma=DEFAULTS.gamma,
    version: int = _KERNEL.version,
    split_vocab: bool = _KERNEL.split_vocab,
    tail=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    row_shards: int = 1,
) -> tuple[jax.Array, Metrics]:
    """Per-pair loss from final hidden states and unembeddings, never forming [2B, T, V] at once.

    Same maths and outputs as `logits_pair_loss` on `hidden @ unembed`; peak memory O(2B C V)
    instead of O(2B T V). Gradients flow to `policy_hidden` and `policy_unembed` only.

    Args:
      policy_hidden: [2B, T, D] final (normed) hidden states of the policy, any float dtype.
      policy_unembed: [D, V] policy unembedding (for tied embeddings: the embedding transposed).
      ref_hidden: [2B, T, D] and ref_unembed: [D, V] of the frozen reference.
      labels, loss_mask, loss, risk, beta, alpha, mu, gamma, version, split_vocab, tail: as in
        `logits_pair_loss`.
      chunk_size: C, static number of tokens whose logits are formed at once.
      row_shards: as in `logits_pair_loss`.

    Returns:
      (losses [B], metrics: TRL-named dict of [B] arrays).
    """
    where = "fused_pair_loss"
    _check_common(labels, loss_mask, loss=loss, risk=risk, mu=mu, version=version, where=where)
    if policy_hidden.shape != ref_hidden.shape or policy_hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"{where}: policy_hidden {policy_hidden.shape} and ref_hidden {ref_hidden.shape} "
            f"must both be [2B, T, D] matching labels {labels.shape}"
        )
    d = policy_hidden.shape[-1]
    if policy_unembed.ndim != 2 or policy_unembed.shape[0] != d:
        raise ValueError(f"{where}: policy_unembed {policy_unembed.shape} must be [D={d}, V]")
    if ref_unembed.shape != policy_unembed.shape:
        raise ValueError(
            f"{where}: ref_unembed {ref_unembed.shape} must match policy_unembed "
            f"{policy_unembed.shape}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be a positive int, got {chunk_size!r}")
    _check_finite(
        where,
        policy_hidden=policy_hidden,
        policy_unembed=policy_unembed,
        ref_hidden=ref_hidden,
        ref_unembed=ref_unembed,
    )
    stats = fused_token_stats(
        policy_hidden,
        policy_unembed,
        ref_hidden,
        ref_unembed,
        labels,
        risk=risk,
        mu=mu,
        tail=_resolve_tail(mu, tail),
        split_vocab=split_vocab,
        chunk_size=min(chunk_size, labels.shape[1]),
        row_shards=row_shards,
    )
    return _pair_loss(
        stats, loss_mask, loss=loss, gamma=gamma, beta=beta, alpha=alpha, version=version
    )
