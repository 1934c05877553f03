"""`token_stats` a few rows at a time, with a hand-written backward pass that saves per-row scalars.

Dimension legend: P positions (rows: all leading axes flattened), V vocabulary, G rows per block
step, S = P / G block steps, H thresholds per row (`THRESHOLDS[risk]`: 1 or 2, none for erm/kl).

Why: written over whole [P, V] arrays, the statistics of `token_stats` and their gradient make XLA
write about ten [P, V] float32 temporaries (the two log-softmaxes, q, d, the selection keys, the
masked products, the backward's recomputations). On a CPU each one is a fresh buffer the size of
the logits (400 MB at 2 x 512 x 49152): writing it costs page faults and memory bandwidth, and
the arithmetic between them is cheap. Here a `fori_loop` hands G rows at a time to the same
`token_stats_and_threshold`, so every temporary is a [G, V] block that stays in cache and is
reused by the next step, and only the per-row statistics and risk thresholds ([P] and [P, H]) are
written out. (Small blocks take the rows' log-softmax shift and log-sum from one reduction over
the whole array, which writes [P] scalars: see `rows_forward` for why their bits matter.)
The backward pass walks the blocks again: for each one it recomputes the block's statistics with
the saved thresholds (the selection is not redone) and writes the block of the gradient with
respect to the policy logits into place; the reference logits get no gradient.

The maths is `token_stats`' own, op for op, per row: only the order in which rows are visited
changes (and, in large blocks, the order of a row's sum of exponentials, within an ulp). Rows sit
in a [G, S, V] view (a free reshape) and step j takes rows j, S + j, 2S + j, ...: the G axis
leads, so rows sharded over devices stay sharded and each device walks its own rows, provided
G is a multiple of the devices (`block_rows(n, shards=...)`, from the train step's batch
layout: `fused_pair_loss(row_shards=...)`). Otherwise SPMD shards the S axis too and gathers
every block at every step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rsa_jax.losses._risk import RISKS
from rsa_jax.losses._select import rows_split_over
from rsa_jax.losses._token_stats import TokenStats, log_softmax_parts, stats_from_log_probs

# Rows per block step: 8 rows of a 49152-entry vocabulary are 1.5 MiB per float32 temporary,
# so the block's handful of temporaries stay in the L2/L3 caches; fewer rows make more loop steps
# (a few microseconds of dispatch each), more rows spill to memory. Its 8 positions x 2
# vocabulary halves are one group of the radix select (`_select._GROUP_ROWS` = 16). Measured on
# the risk head at 2 x 512 x 49152 (CPU seconds): 8 rows 0.88-0.92 s, 16 rows 0.97-0.98 s, 4 rows
# 0.99 s.
BLOCK_ROWS = 8


def block_rows(n: int, most: int = BLOCK_ROWS, shards: int = 1) -> int:
    """G for the [G, S, V] view of n rows: `shards` x the largest g <= `most` dividing n / shards
    (the view is then a free reshape; padding rows would copy the logits).

    `shards`: how many devices the rows are split over (contiguous blocks of n / shards, as a
    batch sharded over the leading axis is; `row_shards`). G must be a multiple of it. With
    G < shards the view puts part of the sharding on the S axis that the loop steps along, and
    SPMD then all-gathers the whole [G, S, V] array at every step: on a 64-chip Llama-3-70B
    step that was 16 TB per chip (docs/scale.md). With G = shards x g each chip walks its own
    n / shards rows, g at a time. When `shards` does not divide n, it is ignored."""
    if shards > 1 and n % shards == 0:
        return shards * block_rows(n // shards, most)
    return next(g for g in range(min(most, n), 0, -1) if n % g == 0)


def _pick(x: jax.Array, j) -> jax.Array:
    """Step j's block [G, ...] of a [G, S, ...] array."""
    return jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)


def _put(out: jax.Array, block: jax.Array, j) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(out, block, j, axis=1)


# Blocks of at least this many entries compute their rows' log-softmax shift and log-sum
# themselves; smaller ones take them from one reduction over all rows. XLA orders the additions of
# a row's sum of exponentials by the shape it reduces and the fusion around it. Measured on its
# CPU backend (jax 0.10.2): below 4096 entries per block (V = 512 x 8 rows) a block's sums differed
# in the last bit between a plain and a vmapped program for half the rows (the tiny test config,
# V = 462), which broke sweeps' equality with sequential runs; from there on they agreed. The
# margin is ours. Why one bit matters, see `rows_forward`.
PARTS_IN_BLOCK_MIN = 1 << 14


def _log_probs_and_parts(policy, ref):
    """Both models' float32 log-softmaxes [..., V] and their rows' parts [..., 4] (each model's
    shift and log-sum, `log_softmax_parts`), which `_log_probs_from_parts` turns back into the
    same log-softmaxes bit for bit."""
    logp, p_shift, p_log_sum = log_softmax_parts(policy)
    logq, q_shift, q_log_sum = log_softmax_parts(jax.lax.stop_gradient(ref))
    return logp, logq, jnp.concatenate([p_shift, p_log_sum, q_shift, q_log_sum], axis=-1)


def _log_probs_from_parts(policy, ref, parts):
    """Both models' float32 log-softmaxes [..., V] from their logits and saved parts [..., 4],
    with `log_softmax_parts`' own ops (so the same bits)."""
    p_shift, p_log_sum, q_shift, q_log_sum = jnp.split(parts, 4, axis=-1)  # [..., 1] each
    logp = (policy.astype(jnp.float32) - p_shift) - p_log_sum
    logq = (jax.lax.stop_gradient(ref).astype(jnp.float32) - q_shift) - q_log_sum
    return logp, logq


def _block_stats(policy, ref, labels, parts, mu, tail, *, risk, split_vocab):
    """One block's statistics [G], threshold [G, H] or None, and its rows' log-softmax parts
    [G, 4] (both models' shift and log-sum): computed here when `parts` is None, else given."""
    if parts is None:
        logp, logq, parts = _log_probs_and_parts(policy, ref)
    else:
        logp, logq = _log_probs_from_parts(policy, ref, parts)
    stats, threshold = stats_from_log_probs(
        logp, logq, labels, risk=risk, mu=mu, tail=tail, split_vocab=split_vocab
    )
    return stats, threshold, parts


def rows_forward(policy, ref, labels, mu, tail, *, risk, split_vocab, shards=1):
    """Statistics of every row, block by block, and what `rows_backward` needs of them.

    Args:
      policy, ref: [G, S, V] logits (any float dtype); labels: [G, S] int; mu, tail: scalars;
      shards: the devices the G axis is split over (`block_rows`), which the risk's selection
        keeps too (`_select.rows_split_over`).
    Returns:
      (TokenStats of [G, S] float32 arrays, saved): `saved` holds per-row scalars only, the
      risk's thresholds [G, S, H] (None for erm and kl) and both log-softmaxes' shift and log-sum
      [G, S, 4].
    """
    # Where the policy equals the reference up to rounding (the first step of a stage) every
    # d(v) is a few ulps around 0, `cvar_reference`'s cut falls among them, and one ulp of a
    # row's log-sum moves whole sets of entries across it (the tiny config's first-step gradient
    # norm moved by 3e-4). So the parts must round alike in every program that should agree:
    # small blocks take them from one reduction over all [G, S, V] rows, as `token_stats` does
    # (XLA rounds a small [G, V] block's reduction differently in plain and vmapped programs,
    # see `PARTS_IN_BLOCK_MIN`). Large blocks compute them in the block, which agrees across plain
    # and vmapped programs and stays within an ulp of the whole-array reduction (tested): that
    # reduction reads both [P, V] logits twice more from memory, 25% of the risk head's time at
    # 2 x 512 x 49152 on the CPU. An ulp off the whole array only picks another tail set at a
    # stage's first step, which rounding noise decides on any backend anyway (docs/method.md).
    g, s = labels.shape
    whole = None
    # The block each device reduces is [G / shards, V].
    if g // shards * policy.shape[-1] < PARTS_IN_BLOCK_MIN:
        # Only the [G, S, 4] parts are used: XLA drops the whole-array log-softmaxes.
        whole = _log_probs_and_parts(policy, ref)[2]

    def block(j):
        return _block_stats(
            _pick(policy, j),
            _pick(ref, j),
            _pick(labels, j),
            None if whole is None else _pick(whole, j),
            mu,
            tail,
            risk=risk,
            split_vocab=split_vocab,
        )

    def step(j, found):
        return jax.tree.map(functools.partial(_put, j=j), found, block(j))

    with rows_split_over(shards):  # the blocks are traced here (forward only: see the module)
        shapes = jax.eval_shape(block, 0)
        empty = jax.tree.map(lambda a: jnp.zeros((g, s, *a.shape[1:]), a.dtype), shapes)
        stats, threshold, parts = jax.lax.fori_loop(0, s, step, empty)
    return stats, (threshold, parts)


def _block_gradient(policy, ref, labels, mu, tail, saved, cotangent, *, risk, split_vocab):
    """d<cotangent, stats>/d(policy logits) of one block [G, V], and d/d(mu).

    With logp = z - lse(z), d = log q - log p and a = c_logp + c_g, s = c_kl q + d(c_rho rho)/dd
    (the cotangent reaching d), the gradient with respect to the logits z is
    `a onehot(y) - p (a - sum_v s) - s`: the statistics' own backward pass written out, so the
    block is read once, with two exponentials per entry (p and q), instead of redoing the
    log-softmaxes and differentiating through them. The log-softmaxes are recomputed from the
    saved per-row parts with the forward's ops, so d (and the risk's mask against the saved
    threshold) is bit for bit the forward's.
    """
    threshold, parts = saved
    logp, logq = _log_probs_from_parts(policy, ref, parts)
    q = jnp.exp(logq)
    d = logq - logp

    def rho(d, mu):
        return RISKS[risk](
            d, q, mu=mu, tail=tail, split_vocab=split_vocab, threshold=threshold, logq=logq
        )

    _, rho_vjp = jax.vjp(rho, d, mu)
    d_rho, d_mu = rho_vjp(cotangent.rho)
    s = cotangent.kl[:, None] * q + d_rho  # [G, V]
    a = (cotangent.logp + cotangent.g)[:, None]  # [G, 1]
    label = jnp.arange(policy.shape[-1]) == labels[:, None].astype(jnp.int32)
    grad = jnp.where(label, a, 0.0) - jnp.exp(logp) * (a - jnp.sum(s, -1, keepdims=True)) - s
    return grad.astype(policy.dtype), d_mu


def rows_backward(policy, ref, labels, mu, tail, saved, cotangent, *, risk, split_vocab):
    """Gradient of <cotangent, statistics> with respect to the policy logits, mu and tail.

    Args:
      policy, ref, labels, mu, tail: as `rows_forward`; saved: its second output;
      cotangent: TokenStats of [G, S] float32 arrays.
    Returns:
      (d_policy [G, S, V] in policy's dtype, d_mu, d_tail scalars). The thresholds are fixed
      here, as they carry no gradient: tail's is zero.
    """

    # The gradient is written over the policy logits, block by block: step j reads block j of
    # the carry (still the logits: no step writes a block before reading it) and writes block j
    # of the gradient in its place. A zero-filled carry would be one more [P, V] buffer to fill,
    # 18% of the risk head's time at 2 x 512 x 49152 on the CPU; where the logits die here (a
    # train step: they are the head matmul's output) XLA writes in place, else it copies them.
    def step(j, carry):
        d_policy, d_mu = carry
        d_block, d_mu_j = _block_gradient(
            _pick(d_policy, j),
            _pick(ref, j),
            _pick(labels, j),
            mu,
            tail,
            jax.tree.map(functools.partial(_pick, j=j), saved),
            jax.tree.map(functools.partial(_pick, j=j), cotangent),
            risk=risk,
            split_vocab=split_vocab,
        )
        return _put(d_policy, d_block, j), d_mu + d_mu_j

    d_policy, d_mu = jax.lax.fori_loop(0, labels.shape[1], step, (policy, jnp.zeros_like(mu)))
    return d_policy, d_mu, jnp.zeros_like(tail)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blocked(policy, ref, labels, mu, tail, risk, split_vocab, shards):
    return _blocked_fwd(policy, ref, labels, mu, tail, risk, split_vocab, shards)[0]


def _blocked_fwd(policy, ref, labels, mu, tail, risk, split_vocab, shards):
    stats, saved = rows_forward(
        policy, ref, labels, mu, tail, risk=risk, split_vocab=split_vocab, shards=shards
    )
    return stats, (policy, ref, labels, mu, tail, saved)


def _blocked_bwd(risk, split_vocab, shards, residuals, cotangent):
    del shards  # the backward pass does no selection
    policy, ref, labels, mu, tail, saved = residuals
    d_policy, d_mu, d_tail = rows_backward(
        policy, ref, labels, mu, tail, saved, cotangent, risk=risk, split_vocab=split_vocab
    )
    # No gradient reaches the reference logits (they enter under stop_gradient) or the labels.
    return d_policy, None, None, d_mu, d_tail


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_token_stats(
    policy_logits, ref_logits, labels, *, risk, mu, tail, split_vocab, rows=BLOCK_ROWS, shards=1
) -> TokenStats:
    """`token_stats`, computed `rows` rows at a time, with the same values and gradients.

    Args:
      policy_logits: [..., V] any float dtype; ref_logits: [..., V] (no gradient flows into
        them); labels: [...] int; risk, mu, tail, split_vocab: as `token_stats`.
      rows: static upper bound on the rows per block step of each device (`block_rows`).
      shards: static number of devices the first axis is split over, each holding whole
        first-axis entries (`block_rows`).
    Returns:
      TokenStats of [...] float32 arrays.
    """
    lead, v = labels.shape, policy_logits.shape[-1]
    g = block_rows(math.prod(lead), rows, shards)
    s = math.prod(lead) // g
    stats = _blocked(
        policy_logits.reshape(g, s, v),
        jax.lax.stop_gradient(ref_logits).reshape(g, s, v),
        labels.reshape(g, s),
        jnp.asarray(mu, jnp.float32),
        jnp.asarray(tail, jnp.float32),
        risk,
        split_vocab,
        shards if g % shards == 0 else 1,  # block_rows ignored a shard count not dividing n
    )
    return jax.tree.map(lambda x: x.reshape(lead), stats)
