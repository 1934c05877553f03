"""Evaluation: per-sample scores to tail-risk metrics, tables and plots.

`scorers` turns (prompt, response) texts into per-sample rewards, costs and catastrophe flags
(`Scorer`, `load_scorer`, `score_samples`); `metrics` turns `SampleScores` into metrics with
prompt-clustered bootstrap intervals (`tail_metrics`); `report` writes `results.json`,
`results.md` and the reward-cost and cost-tail plots, and aggregates seeds. All NumPy; the
sampling driver that produces the per-sample arrays lives in `rsa_jax.eval.sampling`.
"""

from rsa_jax.eval.metrics import (
    DEFAULT_LEVELS,
    Estimate,
    SampleScores,
    bootstrap_metrics,
    metric_names,
    point_metrics,
    tail_metrics,
)
from rsa_jax.eval.prompts import read_prompts
from rsa_jax.eval.report import (
    aggregate_seeds,
    cost_ccdf,
    plot_cost_tail,
    plot_reward_cost,
    read_results,
    results_table,
    seeds_interval,
    write_results,
)
from rsa_jax.eval.scorers import Scorer, load_scorer, score_samples, scorer_name

__all__ = [
    "DEFAULT_LEVELS",
    "Estimate",
    "SampleScores",
    "Scorer",
    "aggregate_seeds",
    "bootstrap_metrics",
    "cost_ccdf",
    "load_scorer",
    "metric_names",
    "plot_cost_tail",
    "plot_reward_cost",
    "point_metrics",
    "read_prompts",
    "read_results",
    "results_table",
    "score_samples",
    "scorer_name",
    "seeds_interval",
    "tail_metrics",
    "write_results",
]
