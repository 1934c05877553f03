"""Pure loss kernels: per-position statistics, risk functionals, the nested risk scan, pair losses.

Arrays in, per-example arrays out; no model, config, mesh or reduction inside. Choose by name:
`LOSSES[name]` (pair losses from sequence statistics) and `RISKS[name]` (one-step risk functionals).
The entry points `logits_pair_loss` and `fused_pair_loss` run the whole chain.
"""

from rsa_jax.losses._head import fused_pair_loss, fused_token_stats, logits_pair_loss
from rsa_jax.losses._kernel import (
    DEFAULT_CHUNK_SIZE,
    DEFAULTS,
    TRACED_NAMES,
    VERSIONS,
    Kernel,
    KernelError,
    LossHyper,
    check_mu,
)
from rsa_jax.losses._preference import LOSSES, dpo, ra_dpo, tdpo
from rsa_jax.losses._risk import (
    MU_DEFAULT,
    MU_DOMAIN,
    MU_MEANING,
    RISKS,
    cvar,
    cvar_reference,
    erm,
    kl,
    quantile_tail,
    torch_rank,
)
from rsa_jax.losses._row_blocks import blocked_token_stats
from rsa_jax.losses._select import (
    kth_smallest_pair,
    kth_smallest_pair_bisect,
    kth_smallest_pair_sort,
    members_split_over,
    upper_tail_atom,
)
from rsa_jax.losses._token_stats import (
    SequenceStats,
    TokenStats,
    nested_risk_value,
    nested_risk_value_dense,
    sequence_stats,
    token_stats,
)

__all__ = [
    "DEFAULTS",
    "DEFAULT_CHUNK_SIZE",
    "Kernel",
    "KernelError",
    "LossHyper",
    "TRACED_NAMES",
    "VERSIONS",
    "check_mu",
    "LOSSES",
    "MU_DEFAULT",
    "MU_DOMAIN",
    "MU_MEANING",
    "RISKS",
    "SequenceStats",
    "TokenStats",
    "blocked_token_stats",
    "cvar",
    "cvar_reference",
    "dpo",
    "erm",
    "fused_pair_loss",
    "fused_token_stats",
    "kl",
    "kth_smallest_pair",
    "kth_smallest_pair_bisect",
    "kth_smallest_pair_sort",
    "members_split_over",
    "logits_pair_loss",
    "nested_risk_value",
    "nested_risk_value_dense",
    "quantile_tail",
    "ra_dpo",
    "sequence_stats",
    "tdpo",
    "token_stats",
    "torch_rank",
    "upper_tail_atom",
]
