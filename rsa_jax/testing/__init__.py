"""Test support: slow NumPy references of every kernel (`reference`) and random cases (`cases`)."""

from rsa_jax.testing import cases, reference
from rsa_jax.testing.reference import (
    log_softmax,
    nested_value,
    pair_loss,
    quantile_linear,
    risk_term,
    sequence_sums,
    token_stats,
    torch_quantile_rank,
)

__all__ = [
    "cases",
    "log_softmax",
    "nested_value",
    "pair_loss",
    "quantile_linear",
    "reference",
    "risk_term",
    "sequence_sums",
    "token_stats",
    "torch_quantile_rank",
]
