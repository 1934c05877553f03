"""Slow NumPy references: executable specifications of the loss kernels.

Everything here is written from `docs/method.md` sections 4-6 (the per-pair loss), and for the
`cvar_reference` risk also from the public Ra-DPO code (github zlj123-max/Ra-DPO,
`Ra-DPO/train/trainers.py`, class `Ra_DPOTrainer`: `get_batch_logps`, `calculate_cvar`, `loss`),
whose behaviour it reproduces. These functions are what the JAX kernels in `rsa_jax.losses` are
tested against, so they favour obviousness over speed:

- float64 throughout, explicit Python loops over rows, positions and vocabulary entries,
  sums with `math.fsum`; nothing vectorised beyond single element-wise steps;
- one function per quantity of the spec, named after it (g, KL, rho, V_t, M, K, S, z).

Use small shapes only (a few rows, T and V in the tens or hundreds).

Dimension legend: N sequences (= 2B), B pairs, T positions, V vocabulary.
Batch layout (contracts): rows [0, B) are the chosen responses (w), rows [B, 2B) the matching
rejected ones (l); `labels[n, t]` is the token predicted at position t, `loss_mask[n, t]` is True
where that token belongs to the response.

Points where the reference deliberately follows torch rather than numpy, or goes beyond the
Ra-DPO code, are documented in the functions concerned (`torch_quantile_rank`, `quantile_linear`,
`risk_term`).
"""

from __future__ import annotations

import math

import numpy as np

RISKS = ("cvar_reference", "cvar", "erm", "kl")
LOSSES = ("dpo", "tdpo", "ra_dpo")
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "kl/chosen",
    "kl/rejected",
    "risk/chosen",
    "risk/rejected",
)


# --------------------------------------------------------------------------- basic numerics


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, float64, max-shifted (any leading shape).

    Args:
      x: [..., V] logits (finite; -inf entries allowed as long as each row has a finite max).
    Returns:
      [..., V] float64 log-probabilities.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:-1]):
        row = x[index]
        top = max(float(v) for v in row)
        total = math.fsum(math.exp(float(v) - top) for v in row)
        log_total = math.log(total)
        for v in range(row.shape[0]):
            out[index + (v,)] = (float(row[v]) - top) - log_total
    return out


def _log_sigmoid(z: float) -> float:
    """log(1 / (1 + exp(-z))) without overflow for large |z|."""
    if z >= 0.0:
        return -math.log1p(math.exp(-z))
    return z - math.log1p(math.exp(z))


# --------------------------------------------------------------------------- quantile


def torch_quantile_rank(n: int, mu: float) -> float:
    """The rank that `torch.quantile(x, 1 - mu)` uses for n float32 values.

    torch turns the Python float `1 - mu` (computed in float64 by Python) into a float32 scalar
    tensor and multiplies it by the last index n - 1 in float32
    (aten/src/ATen/native/Sorting.cpp, `quantile_impl`: `ranks = q * last_index`). numpy computes
    the same product in float64; the two differ when the product lands within float32 rounding of
    an integer (mu = 0.8, n = 16: torch 3.0, numpy 2.9999999999999996). Follow torch
    (docs/method.md section 6).

    Returns:
      the rank as a Python float (exactly the float32 value).
    """
    if n < 1:
        raise ValueError(f"quantile of an empty set (n = {n})")
    tail = np.float32(1.0 - float(mu))
    return float(np.float32(tail * np.float32(n - 1)))


def quantile_linear(values: np.ndarray, mu: float) -> float:
    """The (1 - mu) quantile of a 1-D array: unweighted, linear interpolation, torch's rank.

    Sort ascending to x_(0) <= ... <= x_(n-1); r = torch_quantile_rank(n, mu), lo = floor(r),
    frac = r - lo; the result is x_(lo) when frac == 0 or lo + 1 == n, else the interpolation
    between x_(lo) and x_(lo+1), written as torch.lerp writes it (the two-sided form, so that the
    result never passes x_(lo+1)). torch does that arithmetic in float32; here it is float64.

    Args:
      values: [n] array, n >= 1.
      mu: risk level, 0 <= mu <= 1 (torch requires its q = 1 - mu in [0, 1]).
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must lie in [0, 1] for the quantile, got {mu}")
    ordered = sorted(float(v) for v in np.asarray(values).reshape(-1))
    n = len(ordered)
    rank = torch_quantile_rank(n, mu)
    lo = int(math.floor(rank))
    frac = rank - lo
    if frac == 0.0 or lo + 1 == n:
        return ordered[lo]
    below, above = ordered[lo], ordered[lo + 1]
    if frac < 0.5:
        return below + frac * (above - below)
    return above - (above - below) * (1.0 - frac)


# --------------------------------------------------------------------------- one position


def _kl(d: list[float], q: list[float]) -> float:
    """KL_t = sum_v q(v) d(v); entries with q(v) == 0 contribute 0 (0 log 0 = 0)."""
    return math.fsum(q[v] * d[v] for v in range(len(d)) if q[v] > 0.0)


def _cvar_reference(d: list[float], q: list[float], mu: float, split_vocab: bool) -> float:
    """Ra-DPO's `calculate_cvar`: sum_v q(v) d(v) 1[d(v) > tau_half(v)], no 1/mu.

    With `split_vocab` the vocabulary indices [0, V//2) and [V//2, V) each get their own
    threshold, the (1 - mu) quantile of that half's d values. A half of size 0 contributes
    nothing (torch.quantile would raise on it: only V = 1 reaches this case); a half of size 1
    has its only value as threshold, so the strict mask is empty there.
    """
    size = len(d)
    if split_vocab:
        halves = [list(range(0, size // 2)), list(range(size // 2, size))]
    else:
        halves = [list(range(size))]
    terms = []
    for half in halves:
        if not half:
            continue
        tau = quantile_linear(np.array([d[v] for v in half]), mu)
        for v in half:
            if d[v] > tau and q[v] > 0.0:
                terms.append(q[v] * d[v])
    return math.fsum(terms)


def _cvar(d: list[float], q: list[float], mu: float) -> float:
    """Textbook CVaR_mu of d under q: mean of d over its upper tail of q-mass mu.

    Entries are taken by decreasing d; the one that crosses mass mu contributes only the mass
    still needed. Ties in d need no rule: tied entries have the same d, so the sum is the same.
    """
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"cvar needs 0 < mu <= 1, got {mu}")
    order = sorted(range(len(d)), key=lambda v: d[v], reverse=True)
    remaining = mu
    terms = []
    for v in order:
        if remaining <= 0.0:
            break
        taken = min(q[v], remaining)
        if taken > 0.0:
            terms.append(taken * d[v])
        remaining -= taken
    return math.fsum(terms) / mu


def _erm(d: list[float], logq: list[float], mu: float) -> float:
    """(1/mu) log sum_v q(v) exp(mu d(v)), as a log-sum-exp over log q(v) + mu d(v); mu > 0."""
    if not mu > 0.0:
        raise ValueError(f"erm needs mu > 0, got {mu}")
    exponents = [logq[i] + mu * d[i] for i in range(len(d))]
    m = max(exponents)
    return (m + math.log(math.fsum(math.exp(x - m) for x in exponents))) / mu


def risk_term(
    name: str, logp: np.ndarray, logq: np.ndarray, *, mu: float, split_vocab: bool = True
) -> float:
    """The risk term rho_t at ONE position (docs/method.md section 6).

    d(v) = logq(v) - logp(v), q(v) = exp(logq(v)).

    - "kl": sum_v q(v) d(v) (TDPO's sequential KL term).
    - "cvar_reference": Ra-DPO code, see `_cvar_reference` (strict mask, no 1/mu, q-weighted).
    - "cvar": textbook CVaR of d under q at level mu (0 < mu <= 1); equals "kl" at mu = 1.
    - "erm": (1/mu) log sum_v q(v) exp(mu d(v)) (mu > 0); tends to "kl" as mu -> 0.

    Args:
      name: one of RISKS.
      logp, logq: [V] log-probabilities of the policy and the reference.
      mu: risk level (`confidence_level` in Ra-DPO).
      split_vocab: `cvar_reference` only: per-half thresholds (Ra-DPO `is_split_risk_ratio`).
    Returns:
      rho_t as a Python float.
    """
    logp = np.asarray(logp, dtype=np.float64)
    logq = np.asarray(logq, dtype=np.float64)
    if logp.ndim != 1 or logp.shape != logq.shape:
        raise ValueError(f"need two [V] arrays, got {logp.shape} and {logq.shape}")
    lp = [float(x) for x in logp]
    lq = [float(x) for x in logq]
    d = [lq[v] - lp[v] for v in range(len(lp))]
    q = [math.exp(lq[v]) for v in range(len(lq))]
    if name == "kl":
        return _kl(d, q)
    if name == "cvar_reference":
        return _cvar_reference(d, q, mu, split_vocab)
    if name == "cvar":
        return _cvar(d, q, mu)
    if name == "erm":
        return _erm(d, lq, mu)
    raise ValueError(f"unknown risk {name!r}; expected one of {RISKS}")


# --------------------------------------------------------------------------- sequences


def token_stats(
    policy_logits: np.ndarray,
    ref_logits: np.ndarray,
    labels: np.ndarray,
    *,
    risk: str = "cvar_reference",
    mu: float = 0.95,
    split_vocab: bool = True,
) -> dict[str, np.ndarray]:
    """Per-position quantities of docs/method.md section 4, by loops over n and t.

    Args:
      policy_logits, ref_logits: [N, T, V].
      labels: [N, T] int token ids in [0, V) (masked positions too: the pad id).
    Returns:
      dict of float64 [N, T] arrays: "g" = logp[y_t] - logq[y_t], "kl" = KL_t, "rho" = the
      `risk` term, and "logp" = logp[y_t] (for the `logps/*` metrics).
    """
    policy_logits = np.asarray(policy_logits, dtype=np.float64)
    ref_logits = np.asarray(ref_logits, dtype=np.float64)
    labels = np.asarray(labels)
    n_rows, length, vocab = policy_logits.shape
    if ref_logits.shape != policy_logits.shape or labels.shape != (n_rows, length):
        raise ValueError(
            f"shapes: policy {policy_logits.shape}, ref {ref_logits.shape}, labels {labels.shape}"
        )
    out = {key: np.zeros((n_rows, length), dtype=np.float64) for key in ("g", "kl", "rho", "logp")}
    for n in range(n_rows):
        for t in range(length):
            y = int(labels[n, t])
            if not 0 <= y < vocab:
                raise ValueError(f"label {y} at ({n}, {t}) outside [0, {vocab})")
            logp = log_softmax(policy_logits[n, t])  # [V]
            logq = log_softmax(ref_logits[n, t])  # [V]
            out["logp"][n, t] = logp[y]
            out["g"][n, t] = logp[y] - logq[y]
            out["kl"][n, t] = risk_term("kl", logp, logq, mu=mu)
            out["rho"][n, t] = risk_term(risk, logp, logq, mu=mu, split_vocab=split_vocab)
    return out


def nested_value(rho: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """Nested value over tokens (docs/method.md section 5), by an explicit backwards loop.

    V_{T+1} = 0, V_t = m_t (rho_t + gamma V_{t+1}) + (1 - m_t) V_{t+1}; S = V_1 = result[..., 0].
    A masked-out step copies V_{t+1} exactly (whatever rho_t holds there).

    Args:
      rho: [T] or [N, T]. mask: same shape, bool (or 0/1). gamma: discount.
    Returns:
      float64 array of rho's shape holding V_t.
    """
    rho = np.asarray(rho, dtype=np.float64)
    mask = np.asarray(mask)
    if rho.shape != mask.shape:
        raise ValueError(f"rho {rho.shape} and mask {mask.shape} differ")
    if rho.ndim == 2:
        return np.stack([nested_value(rho[n], mask[n], gamma) for n in range(rho.shape[0])])
    if rho.ndim != 1:
        raise ValueError(f"rho must be [T] or [N, T], got {rho.shape}")
    values = np.zeros(rho.shape[0], dtype=np.float64)
    v_next = 0.0  # V_{T+1}
    for t in range(rho.shape[0] - 1, -1, -1):
        if bool(mask[t]):
            v_next = float(rho[t]) + gamma * v_next
        values[t] = v_next
    return values


def sequence_sums(stats: dict, mask: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
    """Per-sequence sums (docs/method.md sections 4-5).

    Args:
      stats: `token_stats` output ([N, T] arrays "g", "kl", "rho", optionally "logp").
      mask: [N, T] bool response mask.
    Returns:
      dict of float64 [N] arrays: "M" = sum_t m g, "K" = sum_t m KL, "S" = V_1 of
      `nested_value(rho, mask, gamma)`, and "logp" = sum_t m logp[y_t] when stats has it.
    """
    mask = np.asarray(mask, dtype=bool)
    n_rows, length = mask.shape
    keys = ["M", "K"] + (["logp"] if "logp" in stats else [])
    source = {"M": "g", "K": "kl", "logp": "logp"}
    out = {}
    for key in keys:
        out[key] = np.array(
            [
                math.fsum(float(stats[source[key]][n, t]) for t in range(length) if mask[n, t])
                for n in range(n_rows)
            ]
        )
    out["S"] = np.array(
        [nested_value(stats["rho"][n], mask[n], gamma)[0] if length else 0.0 for n in range(n_rows)]
    )
    return out


# --------------------------------------------------------------------------- pair loss


def pair_loss(
    loss: str,
    policy_logits: np.ndarray,
    ref_logits: np.ndarray,
    labels: np.ndarray,
    loss_mask: np.ndarray,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    mu: float = 0.95,
    gamma: float = 1.0,
    version: int = 1,
    risk: str = "cvar_reference",
    split_vocab: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-pair losses and TRL-named metrics (docs/method.md 4; Ra-DPO `Ra_DPOTrainer.loss`).

    - "dpo":    z = beta (M_w - M_l); rewards beta M.
    - "ra_dpo": v1 z = beta ((M_w - M_l) - (S_l - S_w)),
                v2 z = beta ((M_w - M_l) - alpha (S_l - S_w)) (stop-gradient is invisible here);
                rewards beta (M + S).
    - "tdpo":   the ra_dpo formulas with S replaced by the sequential KL sum K = sum_t m KL_t
                (TDPO1/TDPO2); rewards beta (M + K). K has no discount; with gamma = 1 this is
                exactly ra_dpo with risk="kl".
    loss = -log_sigmoid(z).

    Metrics ([B] each): rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}
    (sum_t m log p_policy(y_t)), kl/{chosen,rejected} = K, risk/{chosen,rejected} = the S used
    by the loss (for "tdpo": K; for "dpo": the nested value of `risk`, reported only).

    Args:
      loss: one of LOSSES.
      policy_logits, ref_logits: [2B, T, V]; labels, loss_mask: [2B, T].
    Returns:
      (losses [B] float64, metrics dict of [B] float64 arrays).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    stats = token_stats(
        policy_logits, ref_logits, labels, risk=risk, mu=mu, split_vocab=split_vocab
    )
    sums = sequence_sums(stats, loss_mask, gamma)
    n_rows = sums["M"].shape[0]
    if n_rows % 2:
        raise ValueError(f"need 2B rows (chosen then rejected), got {n_rows}")
    pairs = n_rows // 2
    seq_risk = sums["K"] if loss == "tdpo" else sums["S"]

    losses = np.zeros(pairs, dtype=np.float64)
    metrics = {name: np.zeros(pairs, dtype=np.float64) for name in METRIC_NAMES}
    for i in range(pairs):
        w, l = i, pairs + i
        m_w, m_l = float(sums["M"][w]), float(sums["M"][l])
        s_w, s_l = float(seq_risk[w]), float(seq_risk[l])
        if loss == "dpo":
            z = beta * (m_w - m_l)
            reward_w, reward_l = beta * m_w, beta * m_l
        else:
            weight = 1.0 if version == 1 else alpha
            z = beta * ((m_w - m_l) - weight * (s_l - s_w))
            reward_w, reward_l = beta * (m_w + s_w), beta * (m_l + s_l)
        losses[i] = -_log_sigmoid(z)
        metrics["rewards/chosen"][i] = reward_w
        metrics["rewards/rejected"][i] = reward_l
        metrics["rewards/margins"][i] = reward_w - reward_l
        metrics["rewards/accuracies"][i] = float(reward_w > reward_l)
        metrics["logps/chosen"][i] = sums["logp"][w]
        metrics["logps/rejected"][i] = sums["logp"][l]
        metrics["kl/chosen"][i] = sums["K"][w]
        metrics["kl/rejected"][i] = sums["K"][l]
        metrics["risk/chosen"][i] = s_w
        metrics["risk/rejected"][i] = s_l
    return losses, metrics
