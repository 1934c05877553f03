"""Tasks with exact oracles: the synthetic safety task that `make demo` runs end to end."""

from rsa_jax.tasks.safety import (
    TEMPLATE,
    OracleScorer,
    SafetyTask,
    label_pairs,
    make_tokenizer,
    style_rates,
    write_pairs,
)

__all__ = [
    "TEMPLATE",
    "OracleScorer",
    "SafetyTask",
    "label_pairs",
    "make_tokenizer",
    "style_rates",
    "write_pairs",
]
