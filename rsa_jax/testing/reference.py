"""Slow NumPy references: executable specifications of the loss kernels.

Written from `method.md` section 2 (and, for `cvar_reference`, the public Ra-DPO code,
`Ra-DPO/train/trainers.py`, `Ra_DPOTrainer.calculate_cvar`), with explicit Python loops over
positions and vocabulary entries and float64 arithmetic. Clarity over speed: use small shapes.

Layout as in the kernels: sequences [2B, T] with rows [0, B) chosen and [B, 2B) rejected.
"""

from __future__ import annotations

import math

import numpy as np

RISK_NAMES = ("cvar_reference", "cvar", "erm", "kl")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in float64, max-shifted."""
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def torch_quantile_rank(n: int, mu: float) -> float:
    """`torch.quantile(x, 1 - mu)`'s rank on float32 input: float32(float32(1 - mu) * (n - 1))."""
    tail = np.float32(1.0 - float(mu))
    return float(np.float32(tail * np.float32(n - 1)))


def _torch_lerp(start: float, end: float, weight: float) -> float:
    """torch.lerp's two-sided formula (as torch.quantile interpolates), in float64 here."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def quantile_linear(values: np.ndarray, mu: float) -> float:
    """The (1 - mu) quantile of a 1-D array, unweighted, linear, with torch's float32 rank."""
    ordered = sorted(float(x) for x in values)
    n = len(ordered)
    rank = torch_quantile_rank(n, mu)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    return _torch_lerp(ordered[lo], ordered[hi], rank - lo)


def _cvar_reference(d: np.ndarray, q: np.ndarray, mu: float, split_vocab: bool) -> float:
    v = len(d)
    halves = [range(0, v // 2), range(v // 2, v)] if split_vocab else [range(0, v)]
    rho = 0.0
    for half in halves:
        if len(half) == 0:
            continue
        tau = quantile_linear(np.array([d[i] for i in half]), mu)
        for i in half:
            if d[i] > tau:
                rho += q[i] * d[i]
    return rho


def _cvar(d: np.ndarray, q: np.ndarray, mu: float) -> float:
    """Upper-tail mean of mass mu: take entries by decreasing d until the mass is used up."""
    order = sorted(range(len(d)), key=lambda i: -d[i])
    remaining, total = mu, 0.0
    for i in order:
        take = min(q[i], remaining)
        total += take * d[i]
        remaining -= take
        if remaining <= 0.0:
            break
    return total / mu


def _erm(d: np.ndarray, q: np.ndarray, mu: float) -> float:
    exponents = [mu * d[i] for i in range(len(d))]
    m = max(exponents)
    return (m + math.log(sum(q[i] * math.exp(exponents[i] - m) for i in range(len(d))))) / mu


def risk_term(
    name: str, logp: np.ndarray, logq: np.ndarray, *, mu: float, split_vocab: bool = True
) -> float:
    """rho_t at one position from the [V] log-probabilities of policy and reference."""
    logp = np.asarray(logp, np.float64)
    logq = np.asarray(logq, np.float64)
    d = logq - logp
    q = np.exp(logq)
    if name == "kl":
        return float(sum(q[i] * d[i] for i in range(len(d))))
    if name == "cvar_reference":
        return _cvar_reference(d, q, mu, split_vocab)
    if name == "cvar":
        return _cvar(d, q, mu)
    if name == "erm":
        return _erm(d, q, mu)
    raise ValueError(f"unknown risk {name!r}")


def token_stats(
    policy_logits, ref_logits, labels, *, risk="cvar_reference", mu=0.95, split_vocab=True
) -> dict[str, np.ndarray]:
    """Per-position g, KL and rho ([N, T] float64 each) from [N, T, V] logits and [N, T] labels."""
    n_rows, t_len, _ = np.shape(policy_logits)
    out = {name: np.zeros((n_rows, t_len)) for name in ("g", "kl", "rho", "logp")}
    for n in range(n_rows):
        for t in range(t_len):
            logp = log_softmax(policy_logits[n, t])
            logq = log_softmax(ref_logits[n, t])
            y = int(labels[n, t])
            out["logp"][n, t] = logp[y]
            out["g"][n, t] = logp[y] - logq[y]
            out["kl"][n, t] = risk_term("kl", logp, logq, mu=mu)
            out["rho"][n, t] = risk_term(risk, logp, logq, mu=mu, split_vocab=split_vocab)
    return out


def nested_value(rho: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """V_t = m_t (rho_t + gamma V_{t+1}) + (1 - m_t) V_{t+1}, V_{T+1} = 0; for [T] or [N, T]."""
    rho = np.asarray(rho, np.float64)
    if rho.ndim == 2:
        return np.stack([nested_value(r, m, gamma) for r, m in zip(rho, mask, strict=True)])
    values = np.zeros(len(rho))
    v_next = 0.0
    for t in reversed(range(len(rho))):
        v_next = rho[t] + gamma * v_next if mask[t] else v_next
        values[t] = v_next
    return values


def sequence_sums(stats: dict, mask: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
    """M, K, log-likelihood and S = V_1 per sequence ([N] each)."""
    n_rows = mask.shape[0]
    out = {name: np.zeros(n_rows) for name in ("M", "K", "S", "logp")}
    for n in range(n_rows):
        for t in range(mask.shape[1]):
            if mask[n, t]:
                out["M"][n] += stats["g"][n, t]
                out["K"][n] += stats["kl"][n, t]
                out["logp"][n] += stats["logp"][n, t]
        out["S"][n] = nested_value(stats["rho"][n], mask[n], gamma)[0]
    return out


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def pair_loss(
    loss: str,
    policy_logits,
    ref_logits,
    labels,
    loss_mask,
    *,
    beta=0.1,
    alpha=0.5,
    mu=0.95,
    gamma=1.0,
    version=1,
    risk="cvar_reference",
    split_vocab=True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-pair loss [B] and TRL-named metrics for `dpo`, `tdpo` or `ra_dpo` (method.md 2.7-2.8).

    TDPO is Ra-DPO whose risk is the sequential KL sum K (so its `risk/*` metrics are K).
    """
    if loss == "tdpo":
        risk = "kl"
    stats = token_stats(
        policy_logits, ref_logits, labels, risk=risk, mu=mu, split_vocab=split_vocab
    )
    sums = sequence_sums(stats, np.asarray(loss_mask, bool), gamma)
    if loss == "tdpo":
        sums["S"] = sums["K"]
    b = len(sums["M"]) // 2
    losses = np.zeros(b)
    metrics = {
        name: np.zeros(b)
        for name in (
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
    }
    for i in range(b):
        m_w, m_l = sums["M"][i], sums["M"][b + i]
        s_w, s_l = sums["S"][i], sums["S"][b + i]
        if loss == "dpo":
            z = beta * (m_w - m_l)
            r_w, r_l = beta * m_w, beta * m_l
        elif loss in ("ra_dpo", "tdpo"):
            if version == 1:
                z = beta * ((m_w - m_l) - (s_l - s_w))
            else:
                z = beta * ((m_w - m_l) - alpha * (s_l - s_w))
            r_w, r_l = beta * (m_w + s_w), beta * (m_l + s_l)
        else:
            raise ValueError(f"unknown loss {loss!r}")
        losses[i] = -_log_sigmoid(z)
        metrics["rewards/chosen"][i] = r_w
        metrics["rewards/rejected"][i] = r_l
        metrics["rewards/margins"][i] = r_w - r_l
        metrics["rewards/accuracies"][i] = float(r_w > r_l)
        metrics["logps/chosen"][i] = sums["logp"][i]
        metrics["logps/rejected"][i] = sums["logp"][b + i]
        metrics["kl/chosen"][i] = sums["K"][i]
        metrics["kl/rejected"][i] = sums["K"][b + i]
        metrics["risk/chosen"][i] = s_w
        metrics["risk/rejected"][i] = s_l
    return losses, metrics
