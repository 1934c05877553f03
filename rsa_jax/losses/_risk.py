"""One-step risk functionals Phi^mu of the vocabulary log-ratio under the reference distribution.

Dimension legend: N positions (any leading shape), V vocabulary.

Every functional has the same signature so that `RISKS[name]` can be swapped without branches:

    fn(d [..., V], q [..., V], *, mu, tail, split_vocab, threshold=None, logq=None) -> rho [...]

with `d(v) = log q(v) - log p(v)` (float32) and `q` the reference probabilities (no gradient).
`mu` is the risk parameter (traced). `tail` is `1 - mu` as the rank computation of
`cvar_reference` needs it (see `quantile_tail`); `split_vocab` only matters to `cvar_reference`.
`threshold` lets a caller pass the (non-differentiable) selection result `THRESHOLDS[name]` that it
already computed for the same d, so that a rematerialised backward pass does not repeat it;
`logq` is log q itself, which `erm` needs where q underflows.
Reference: docs/method.md section 6; Ra-DPO (arXiv 2505.20359), `Ra_DPOTrainer`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from rsa_jax.losses._select import kth_smallest_pair, upper_tail_atom

RiskFn = Callable[..., jax.Array]

# ERM switches from the expm1/log1p form (exact as mu -> 0) to the shifted logsumexp form (no
# overflow for large mu * d) once some |mu * (d - KL)| exceeds this.
_ERM_SMALL = 1.0


def quantile_tail(mu) -> jax.Array:
    """float32 `1 - mu`, rounded the way `torch.quantile(x, 1 - mu)` rounds it.

    torch receives `1 - mu` computed in float64 by Python and rounds it to float32. When `mu` is a
    concrete Python/NumPy number we do the same on the host. A traced `mu` is already float32, so
    `1 - mu` is computed in float32 (exact for mu in [0.5, 1], but it can differ from torch's
    rounding of the float64 difference); pass `tail` explicitly (the trainer does) for torch parity.
    """
    if isinstance(mu, Tracer):
        return 1.0 - mu.astype(jnp.float32)
    return jnp.asarray(np.float32(1.0 - np.asarray(mu, np.float64)))


def torch_rank(tail: jax.Array, n: int) -> jax.Array:
    """float32 rank `r = tail * (n - 1)` of `torch.quantile` (linear interpolation)."""
    return jnp.asarray(tail, jnp.float32) * jnp.float32(n - 1)


def _torch_lerp(start: jax.Array, end: jax.Array, weight: jax.Array) -> jax.Array:
    # torch.lerp's two-sided formula; it decides which sorted value an interpolated threshold
    # rounds onto, so the strict mask below keeps exactly torch's entries.
    return jnp.where(
        weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight)
    )


def _linear_quantile_pair(x, valid, n, tail):
    """torch.quantile(x[valid], tail) per row (unweighted, linear), by selection, with the two
    order statistics it interpolates between.

    Args:
      x: [..., W] float32; valid: [..., W] bool with exactly n True per row; tail: scalar.
    Returns:
      (tau, x_k, x_k1): [...] float32 each, x_k <= tau <= x_k1 (see `_cut`).
    """
    rank = torch_rank(tail, n)
    lo = jnp.floor(rank)
    k = jnp.clip(lo.astype(jnp.int32), 0, n - 1)
    x_lo, x_hi = kth_smallest_pair(x, jnp.broadcast_to(k, x.shape[:-1]), valid)
    return _torch_lerp(x_lo, x_hi, rank - lo), x_lo, x_hi


def _linear_quantile(x: jax.Array, valid: jax.Array, n: int, tail: jax.Array) -> jax.Array:
    """torch.quantile(x[valid], tail) per row (unweighted, linear), by selection.

    Args:
      x: [..., W] float32; valid: [..., W] bool with exactly n True per row; tail: scalar.
    Returns:
      [...] float32 threshold.
    """
    return _linear_quantile_pair(x, valid, n, tail)[0]


def _in_gap(low: jax.Array, high: jax.Array, fallback: jax.Array) -> jax.Array:
    """The middle of (low, high) where a float lies in [low, high) there, else `fallback`."""
    middle = low + 0.5 * (high - low)
    return jnp.where(jnp.isfinite(middle) & (middle >= low) & (middle < high), middle, fallback)


def _middle_of_cut(x: jax.Array, valid: jax.Array, tau: jax.Array) -> jax.Array:
    """A threshold that keeps the same entries as `x > tau`, moved to the middle of the gap
    between the largest valid entry <= tau and the smallest one > tau.

    Why: at an integer quantile rank (lerp weight 0, e.g. mu = 0.5 with 231 entries per half)
    `tau` *is* one of the values, so `x > tau` decides that entry by comparing it with itself.
    The fused head compares the thresholds of its forward pass with a log-ratio recomputed in
    the backward pass, whose rounding may differ by an ulp, and then the gradient counts an
    entry that the loss left out (seen in training: q(v) * grad d(v) ~ 1e-5 in the tied
    embedding row of the rank-k token). In the middle of the gap the cut survives any
    recomputation error below half the gap. Where no float lies strictly inside the gap (ties,
    adjacent floats, nothing above tau) `tau` is kept.

    Args:
      x: [..., W] float32; valid: [..., W] bool; tau: [...] float32.
    Returns:
      [...] float32 with `x > result` == `x > tau` on the valid entries.
    """
    t = tau[..., None]
    below = jnp.max(jnp.where(valid & (x <= t), x, -jnp.inf), axis=-1)
    above = jnp.min(jnp.where(valid & (x > t), x, jnp.inf), axis=-1)
    return _in_gap(below, above, tau)


def _cut(x: jax.Array, valid: jax.Array, n: int, tail: jax.Array) -> jax.Array:
    """torch.quantile's threshold of `x[valid]`, as a cut in the middle of its gap.

    The lerp keeps `x_k <= tau <= x_k1` (its weight is in [0, 1)). Where `tau < x_k1` the gap
    around tau is (x_k, x_k1) itself: every valid entry is at most x_k or at least x_k1 (they are
    consecutive order statistics). Only where tau lands on x_k1 (ties at the rank, or a weight
    that rounds up) is the entry above the gap unknown; then, and only if some row of the call
    needs it, the two masked passes of `_middle_of_cut` run. They are two full passes over the
    row, a large fraction of the selection's cost, and a trained policy rarely has ties at the
    rank.
    (Under `vmap` the `cond` becomes a `select`, which runs them every time, as before. With the
    rows sharded over devices its predicate is one boolean all-reduce per call.)
    """
    tau, x_k, x_k1 = _linear_quantile_pair(x, valid, n, tail)
    known = (x_k <= tau) & (tau < x_k1)
    return jax.lax.cond(
        jnp.all(known),
        lambda: _in_gap(x_k, x_k1, tau),
        lambda: jnp.where(known, _in_gap(x_k, x_k1, tau), _middle_of_cut(x, valid, tau)),
    )


def cvar_reference_threshold(d, q, *, mu, tail, split_vocab):
    """Per-half thresholds `tau` of `cvar_reference`: [..., 2] with `split_vocab`, else [..., 1].

    `d > tau` keeps exactly the entries above torch.quantile's threshold; the value returned
    lies in the middle of the gap that this cut leaves (`_middle_of_cut`), not on an entry."""
    del q, mu
    v = d.shape[-1]
    if not split_vocab:
        return _cut(d, jnp.ones(d.shape, bool), v, tail)[..., None]
    first, second = v // 2, v - v // 2
    if first == second:
        # Even V: the halves are a free reshape, and one selection call serves both.
        halves = d.reshape(*d.shape[:-1], 2, first)  # [..., 2, V/2]
        return _cut(halves, jnp.ones(halves.shape, bool), first, tail)
    # [..., 2, second]: the first half padded by one entry when V is odd.
    pad = [(0, 0)] * (d.ndim - 1) + [(0, second - first)]
    halves = jnp.stack([jnp.pad(d[..., :first], pad), d[..., first:]], axis=-2)
    valid = jnp.broadcast_to(jnp.arange(second) < jnp.array([[first], [second]]), halves.shape)
    return jnp.stack(
        [
            _cut(halves[..., 0, :], valid[..., 0, :], first, tail),
            _cut(halves[..., 1, :], valid[..., 1, :], second, tail),
        ],
        axis=-1,
    )


def cvar_reference(d, q, *, mu, tail, split_vocab, threshold=None, logq=None):
    """Ra-DPO's CVaR term: q-weighted sum of d over the entries above an unweighted quantile.

    `tau` = the `tail` (= 1 - mu) linear-interpolation quantile of the V values d(v), unweighted;
    `rho = sum_v q(v) d(v) 1[d(v) > tau]` (strict, no 1/mu, no gradient through the mask). With
    `split_vocab` the vocabulary halves [0, V//2) and [V//2, V) each get their own tau and mask,
    as in the reference code's default `is_split_risk_ratio: true`.

    Args:
      d: [..., V] float32 log-ratio; q: [..., V] reference probabilities; mu: unused here
        (the rank comes from `tail`); tail: scalar float32 `1 - mu`; split_vocab: static bool;
        threshold: optional precomputed `cvar_reference_threshold` (the fused head's backward).
    Returns:
      [...] float32 risk term.
    """
    del logq
    d_fixed = jax.lax.stop_gradient(d)
    if threshold is None:
        threshold = cvar_reference_threshold(d_fixed, q, mu=mu, tail=tail, split_vocab=split_vocab)
    if split_vocab:
        in_first = jnp.arange(d.shape[-1]) < d.shape[-1] // 2
        tau = jnp.where(in_first, threshold[..., :1], threshold[..., 1:])  # [..., V]
    else:
        tau = threshold  # [..., 1]
    return jnp.sum(jnp.where(d_fixed > tau, q * d, 0.0), axis=-1)


def cvar_threshold(d, q, *, mu, tail, split_vocab):
    """Two cuts around the VaR atom `t*` of `cvar` (one of the values of d): [..., 2] =
    (lower, upper) with `lower < d <= upper` exactly on the atom's entries, `d > upper` exactly
    above it, each cut in the middle of its gap to the neighbouring values (see
    `_middle_of_cut`: the fused head's backward compares a recomputed d with them, and cuts on
    the atom itself would let an ulp of recomputation move the atom's q between the weights)."""
    del tail, split_vocab
    atom = upper_tail_atom(d, jax.lax.stop_gradient(q), jnp.asarray(mu, jnp.float32))
    a = atom[..., None]
    below = jnp.max(jnp.where(d < a, d, -jnp.inf), axis=-1)
    above = jnp.min(jnp.where(d > a, d, jnp.inf), axis=-1)
    return jnp.stack([_in_gap(below, atom, below), _in_gap(atom, above, atom)], axis=-1)


def cvar(d, q, *, mu, tail, split_vocab, threshold=None, logq=None):
    """Textbook CVaR_mu of d under q: the mean of d over its upper tail of probability mass mu.

    `rho = (1/mu) sum_v w(v) d(v)` with `w = q` above the VaR atom `t*` and the atom's entries
    sharing the remaining mass `mu - P(d > t*)` in proportion to q (so the atom is split exactly).
    Equals `t* + (1/mu) E_q[(d - t*)_+]` (Rockafellar-Uryasev). At mu = 1 it is `KL_t`.
    The weights carry no gradient; d(rho)/d(d) = w / mu is CVaR's exact (sub)gradient.

    Args/Returns: as `cvar_reference`; requires 0 < mu <= 1.
    """
    del logq
    mu = jnp.asarray(mu, jnp.float32)
    d_fixed, q = jax.lax.stop_gradient(d), jax.lax.stop_gradient(q)
    if threshold is None:
        threshold = cvar_threshold(d_fixed, q, mu=mu, tail=tail, split_vocab=split_vocab)
    above = d_fixed > threshold[..., 1:]
    at = (d_fixed > threshold[..., :1]) & ~above
    mass_above = jnp.sum(jnp.where(above, q, 0.0), axis=-1, keepdims=True)
    mass_at = jnp.sum(jnp.where(at, q, 0.0), axis=-1, keepdims=True)
    atom_share = jnp.clip((mu - mass_above) / jnp.maximum(mass_at, 1e-30), 0.0, 1.0)
    w = jnp.where(above, q, jnp.where(at, q * atom_share, 0.0))
    return jnp.sum(w * d, axis=-1) / mu


def erm(d, q, *, mu, tail, split_vocab, threshold=None, logq=None):
    """Entropic risk `(1/mu) log E_q[exp(mu d)]`, mu > 0; tends to `KL_t` as mu -> 0.

    Centred on `KL = E_q[d]`: `ERM = KL + (1/mu) log E_q[exp(s)]` with `s = mu (d - KL)`. For small
    |s| the log is `log1p(E_q[expm1(s)])`, which keeps full relative precision as mu -> 0 where the
    plain logsumexp would cancel; otherwise `logsumexp(log q + s)`, shifted by its own maximum, so
    neither large `mu d` nor reference probabilities that underflow float32 (log q < -87, where
    the largest terms of the sum live) can turn it into inf or NaN.

    Args/Returns: as `cvar_reference`, plus `logq` [..., V] (the log of q; recomputed from q
      when not given, which loses the entries whose q underflowed).
    """
    del tail, split_vocab, threshold
    mu = jnp.asarray(mu, jnp.float32)
    logq = jnp.log(q) if logq is None else jax.lax.stop_gradient(logq)
    kl_t = jnp.sum(q * d, axis=-1, keepdims=True)
    s = mu * (d - kl_t)
    exponent = logq + s  # log of each term q(v) exp(s(v))
    shift = jax.lax.stop_gradient(jnp.max(exponent, axis=-1, keepdims=True))
    small = jnp.max(jnp.abs(jax.lax.stop_gradient(s)), axis=-1, keepdims=True) <= _ERM_SMALL
    # One [..., V] array of terms for both forms (selected per position): the clipped expm1 keeps
    # the form not taken finite, so its gradient cannot poison the other.
    terms = jnp.where(
        small, q * jnp.expm1(jnp.clip(s, -_ERM_SMALL, _ERM_SMALL)), jnp.exp(exponent - shift)
    )
    total = jnp.sum(terms, axis=-1, keepdims=True)
    # Each log only ever sees its own form's total (the other gets a harmless 0 or 1): the small
    # form's total is exactly 0 when policy == reference, and log(0) would make NaN gradients.
    log_mgf = jnp.where(
        small,
        jnp.log1p(jnp.where(small, total, 0.0)),
        shift + jnp.log(jnp.where(small, 1.0, total)),
    )
    return (kl_t + log_mgf / mu)[..., 0]


def kl(d, q, *, mu, tail, split_vocab, threshold=None, logq=None):
    """The sequential KL term `KL_t = sum_v q(v) d(v)` (turns the risk-aware loss into TDPO)."""
    del mu, tail, split_vocab, threshold, logq
    return jnp.sum(q * d, axis=-1)


RISKS: dict[str, RiskFn] = {
    "cvar_reference": cvar_reference,
    "cvar": cvar,
    "erm": erm,
    "kl": kl,
}

# The non-differentiable selection part of each functional, for those that have one; the fused
# head computes it once in the forward pass and reuses it in the backward pass.
THRESHOLDS: dict[str, RiskFn] = {"cvar_reference": cvar_reference_threshold, "cvar": cvar_threshold}

# Domain of mu per functional, checked eagerly: lower < mu <= upper.
MU_DOMAIN: dict[str, tuple[float, float]] = {
    "cvar_reference": (0.0, 1.0),
    "cvar": (0.0, 1.0),
    "erm": (0.0, float("inf")),
    "kl": (-float("inf"), float("inf")),
}

# What mu means per functional (None: unused), and its value when a sweep switches a stage to
# a functional whose mu means something else without giving mu (the CVaR level of the Ra-DPO
# code; the ERM coefficient its authors report). A CVaR level of 0.95 kept as an ERM
# coefficient would be a silently different experiment.
MU_MEANING: dict[str, str | None] = {
    "cvar_reference": "CVaR level",
    "cvar": "CVaR level",
    "erm": "ERM coefficient",
    "kl": None,
}
MU_DEFAULT: dict[str, float | None] = {"cvar_reference": 0.95, "cvar": 0.95, "erm": 5.0, "kl": None}
