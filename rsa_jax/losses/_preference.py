"""Pair losses from per-sequence statistics: DPO, TDPO (1, 2) and Ra-DPO (1, 2).

Dimension legend: B pairs.

All losses share one signature, `fn(chosen, rejected, *, beta, alpha, version) -> (losses [B],
metrics)`, where `chosen`/`rejected` are `SequenceStats` of [B] arrays. The RSA stage loss is
`ra_dpo` with the stage's beta; TDPO is `ra_dpo` with the sequential KL as its risk.

  DPO:            z = beta (M_w - M_l)
  Ra-DPO/TDPO v1: z = beta ((M_w - M_l) - (S_l - S_w))
  Ra-DPO/TDPO v2: z = beta ((M_w - M_l) - alpha (S_l - stop_gradient(S_w)))
  loss = -log_sigmoid(z)

References: docs/method.md section 4; Zeng et al. 2024 (TDPO); Zhang et al. 2025 (Ra-DPO).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rsa_jax.losses._token_stats import SequenceStats

Metrics = dict[str, jax.Array]
PairLossFn = Callable[..., tuple[jax.Array, Metrics]]


def _metrics(chosen: SequenceStats, rejected: SequenceStats, beta, reward_w, reward_l) -> Metrics:
    """TRL-named per-pair metrics; `reward_*` are the implicit rewards before scaling by beta."""
    r_w = jax.lax.stop_gradient(beta * reward_w)
    r_l = jax.lax.stop_gradient(beta * reward_l)
    sg = jax.lax.stop_gradient
    return {
        "rewards/chosen": r_w,
        "rewards/rejected": r_l,
        "rewards/margins": r_w - r_l,
        "rewards/accuracies": (r_w > r_l).astype(jnp.float32),
        "logps/chosen": sg(chosen.logp),
        "logps/rejected": sg(rejected.logp),
        "kl/chosen": sg(chosen.K),
        "kl/rejected": sg(rejected.K),
        "risk/chosen": sg(chosen.S),
        "risk/rejected": sg(rejected.S),
    }


def dpo(chosen: SequenceStats, rejected: SequenceStats, *, beta, alpha=0.0, version=1):
    """DPO: `-log_sigmoid(beta (M_w - M_l))` per pair (alpha and version are ignored).

    Args:
      chosen, rejected: SequenceStats of [B] arrays. beta: traced temperature.
    Returns:
      (losses [B], metrics dict of [B] arrays).
    """
    del alpha, version
    beta = jnp.asarray(beta, jnp.float32)
    z = beta * (chosen.M - rejected.M)
    # log_sigmoid is the stable form of log(1 / (1 + exp(-z))).
    return -jax.nn.log_sigmoid(z), _metrics(chosen, rejected, beta, chosen.M, rejected.M)


def ra_dpo(chosen: SequenceStats, rejected: SequenceStats, *, beta, alpha=0.5, version=1):
    """Ra-DPO (the RSA stage loss): DPO's margin corrected by the nested risk of both sides.

    version 1: `z = beta ((M_w - M_l) - (S_l - S_w))`;
    version 2: `z = beta ((M_w - M_l) - alpha (S_l - stop_gradient(S_w)))`.

    Args:
      chosen, rejected: SequenceStats of [B] arrays. beta, alpha: traced. version: static 1 or 2.
    Returns:
      (losses [B], metrics dict of [B] arrays); `rewards/*` are `beta * (M + S)`.
    Example:
      >>> import jax.numpy as jnp
      >>> from rsa_jax.losses import SequenceStats
      >>> stats_w = SequenceStats(*[jnp.array([0.5])] * 4)  # logp, M, K, S of the chosen
      >>> stats_l = SequenceStats(*[jnp.array([0.0])] * 4)
      >>> losses, metrics = ra_dpo(stats_w, stats_l, beta=0.1, alpha=0.5, version=2)
      >>> round(float(losses[0]), 4)  # -log sigmoid(0.1 (0.5 - 0.5 (0 - 0.5)))
      0.6564
    """
    beta = jnp.asarray(beta, jnp.float32)
    margin = chosen.M - rejected.M
    if version == 1:
        z = beta * (margin - (rejected.S - chosen.S))
    elif version == 2:
        alpha = jnp.asarray(alpha, jnp.float32)
        z = beta * (margin - alpha * (rejected.S - jax.lax.stop_gradient(chosen.S)))
    else:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    metrics = _metrics(chosen, rejected, beta, chosen.M + chosen.S, rejected.M + rejected.S)
    return -jax.nn.log_sigmoid(z), metrics


def tdpo(chosen: SequenceStats, rejected: SequenceStats, *, beta, alpha=0.5, version=1):
    """TDPO: `ra_dpo` with the sequential KL sum K in place of the nested risk S."""
    return ra_dpo(
        chosen._replace(S=chosen.K),
        rejected._replace(S=rejected.K),
        beta=beta,
        alpha=alpha,
        version=version,
    )


LOSSES: dict[str, PairLossFn] = {"dpo": dpo, "tdpo": tdpo, "ra_dpo": ra_dpo}
