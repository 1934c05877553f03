"""Per-position statistics, the nested risk value over tokens, and the per-sequence sums.

Dimension legend: N sequences (2B: chosen rows then rejected rows), T tokens, V vocabulary.

Per response position t (docs/method.md sections 4-5), with `logp`/`logq` the policy/reference
log-softmax in float32:
  g_t    = logp[y_t] - logq[y_t]                       token margin
  d_t(v) = logq(v) - logp(v)                           vocabulary log-ratio
  KL_t   = sum_v q(v) d_t(v)                           sequential KL (TDPO)
  rho_t  = Phi^mu_{v ~ q}(d_t(v))                      risk term (`RISKS[name]`)
  V_t    = m_t (rho_t + gamma V_{t+1}) + (1 - m_t) V_{t+1},  V_{T+1} = 0   nested value
  M = sum_t m_t g_t,  K = sum_t m_t KL_t,  S = V_1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rsa_jax.losses._risk import RISKS, THRESHOLDS


class TokenStats(NamedTuple):
    """Per-position statistics, each [..., T] float32 (unmasked; padding holds finite junk)."""

    logp: jax.Array  # log p(y_t): policy log-probability of the label
    g: jax.Array  # token margin
    kl: jax.Array  # sequential KL term
    rho: jax.Array  # risk term


class SequenceStats(NamedTuple):
    """Per-sequence sums, each [N] float32."""

    logp: jax.Array  # sum_t m_t log p(y_t)
    M: jax.Array  # sum_t m_t g_t
    K: jax.Array  # sum_t m_t KL_t
    S: jax.Array  # nested risk value V_1


def log_softmax_parts(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`jax.nn.log_softmax` in float32 (the same ops, so the same bits) and its per-row parts.

    Args:
      logits: [..., V] any float dtype.
    Returns:
      (logp [..., V], shift [..., 1], log_sum [..., 1]) with `logp = (logits - shift) - log_sum`:
      recomputing logp from the two saved scalars rounds exactly as the first time.
    """
    x = logits.astype(jnp.float32)
    shift = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    shifted = x - shift
    log_sum = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    return shifted - log_sum, shift, log_sum


def stats_from_log_probs(
    logp: jax.Array,
    logq: jax.Array,
    labels: jax.Array,
    *,
    risk: str,
    mu,
    tail,
    split_vocab: bool,
    threshold=None,
) -> tuple[TokenStats, jax.Array | None]:
    """`token_stats_and_threshold` from the float32 log-softmaxes [..., V] of both models."""
    labels = labels[..., None].astype(jnp.int32)
    logp_y = jnp.take_along_axis(logp, labels, axis=-1)[..., 0]
    logq_y = jnp.take_along_axis(logq, labels, axis=-1)[..., 0]
    q = jnp.exp(logq)
    d = logq - logp
    kl_t = jnp.sum(q * d, axis=-1)
    if threshold is None and risk in THRESHOLDS:
        threshold = THRESHOLDS[risk](
            jax.lax.stop_gradient(d), q, mu=mu, tail=tail, split_vocab=split_vocab
        )
    rho = RISKS[risk](
        d, q, mu=mu, tail=tail, split_vocab=split_vocab, threshold=threshold, logq=logq
    )
    return TokenStats(logp=logp_y, g=logp_y - logq_y, kl=kl_t, rho=rho), threshold


def token_stats_and_threshold(
    policy_logits: jax.Array,
    ref_logits: jax.Array,
    labels: jax.Array,
    *,
    risk: str,
    mu,
    tail,
    split_vocab: bool,
    threshold=None,
) -> tuple[TokenStats, jax.Array | None]:
    """Statistics of every position from the two models' logits, and the risk's threshold.

    Args:
      policy_logits: [..., V] any float dtype (upcast to float32).
      ref_logits: [..., V] reference logits; no gradient flows into them.
      labels: [...] int token ids.
      risk: key of `RISKS` (static). mu, tail: traced scalars (see `quantile_tail`).
      split_vocab: static, `cvar_reference` only.
      threshold: optional result of `THRESHOLDS[risk]` for these logits, reused instead of redone.

    Returns:
      (TokenStats of [...] float32 arrays, the threshold used or None for risks without one).
    """
    # log_softmax, never softmax().log(): the latter underflows to 0 * -inf = NaN in the KL.
    logp, _, _ = log_softmax_parts(policy_logits)
    logq, _, _ = log_softmax_parts(jax.lax.stop_gradient(ref_logits))
    return stats_from_log_probs(
        logp,
        logq,
        labels,
        risk=risk,
        mu=mu,
        tail=tail,
        split_vocab=split_vocab,
        threshold=threshold,
    )


def token_stats(policy_logits, ref_logits, labels, *, risk, mu, tail, split_vocab) -> TokenStats:
    """`token_stats_and_threshold` without the threshold: TokenStats of [...] float32 arrays."""
    return token_stats_and_threshold(
        policy_logits, ref_logits, labels, risk=risk, mu=mu, tail=tail, split_vocab=split_vocab
    )[0]


def nested_risk_value(rho: jax.Array, mask: jax.Array, gamma) -> jax.Array:
    """Nested risk value of every suffix, by a reverse `lax.scan` over tokens.

    `V_t = m_t (rho_t + gamma V_{t+1}) + (1 - m_t) V_{t+1}` with `V_{T+1} = 0`; masked steps are
    exact no-ops (they pass `V_{t+1}` through untouched).

    Args:
      rho: [N, T] float32 risk terms; mask: [N, T] bool; gamma: traced discount.
    Returns:
      [N, T] float32, V_t for every t (the sequence's nested risk is column 0).
    """
    gamma = jnp.asarray(gamma, jnp.float32)

    def step(v_next, inputs):
        rho_t, m_t = inputs  # [N], [N]
        v_t = jnp.where(m_t, rho_t + gamma * v_next, v_next)
        return v_t, v_t

    time_major = (rho.astype(jnp.float32).T, mask.T)  # [T, N] each
    _, values = jax.lax.scan(step, jnp.zeros(rho.shape[:1], jnp.float32), time_major, reverse=True)
    return values.T  # [N, T]


def nested_risk_value_dense(rho: jax.Array, mask: jax.Array, gamma) -> jax.Array:
    """Vectorised twin of `nested_risk_value`: `V_t = sum_{s>=t} m_s rho_s gamma^(c_s - c_t)`.

    `c_t` counts the unmasked positions before t, so the exponent is the number of response tokens
    between t and s. O(T^2) memory: for tests and short sequences.

    Args/Returns: as `nested_risk_value`.
    """
    gamma = jnp.asarray(gamma, jnp.float32)
    m = mask.astype(jnp.float32)
    c = jnp.cumsum(m, axis=-1) - m  # [N, T] response tokens strictly before t
    t_idx = jnp.arange(rho.shape[-1])
    upper = t_idx[None, :] >= t_idx[:, None]  # [T(t), T(s)]: s >= t
    exponent = jnp.where(upper, c[:, None, :] - c[:, :, None], 0.0)  # [N, T, T]
    weights = jnp.where(upper, jnp.power(gamma, exponent), 0.0) * m[:, None, :]
    return jnp.einsum("nts,ns->nt", weights, rho.astype(jnp.float32))


def sequence_stats(stats: TokenStats, mask: jax.Array, gamma) -> SequenceStats:
    """Masked sequence sums M, K, the log-likelihood, and the nested risk S = V_1.

    Args:
      stats: TokenStats of [N, T] arrays; mask: [N, T] bool response mask; gamma: traced.
    Returns:
      SequenceStats of [N] arrays.
    """

    def masked_sum(x):
        return jnp.sum(jnp.where(mask, x, 0.0), axis=-1)

    return SequenceStats(
        logp=masked_sum(stats.logp),
        M=masked_sum(stats.g),
        K=masked_sum(stats.kl),
        S=nested_risk_value(stats.rho, mask, gamma)[:, 0],
    )
