"""Evaluation: per-sample scores to tail-risk metrics, tables and plots.

`scorers` turns (prompt, response) texts into per-sample rewards, costs and catastrophe flags
(`Scorer`, `load_scorer`, `score_samples`); `metrics` turns `SampleScores` into metrics with
prompt-clustered bootstrap intervals (`tail_metrics`); `report` writes `results.json`,
`results.md` and the reward-cost and cost-tail plots, and aggregates seeds; the frontier modules
compare methods through families of variants (Pareto frontiers of reward against each cost
statistic, the paired reward gap at equal cost, Algorithm 1's constrained choice, and
`run_frontier`, the `rsa-jax frontier` command). All NumPy; the
sampling driver that produces the per-sample arrays lives in `rsa_jax.eval.sampling`.
"""

from rsa_jax.eval._frontier import (
    FRONTIER_STATISTICS,
    Choice,
    Constraint,
    Frontier,
    Gap,
    constrained_choice,
    interpolate_reward,
    pareto_frontier,
    pareto_indices,
    parse_constraint,
    reward_gap,
    seed_gap,
    t_interval,
)
from rsa_jax.eval._frontier_io import (
    FrontierInputError,
    Loaded,
    load_frontier_inputs,
    results_files,
    select_methods,
)
from rsa_jax.eval._frontier_report import (
    format_summary,
    frontier_summary,
    plot_frontier,
    pool_seeds,
    run_frontier,
)
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
    "FRONTIER_STATISTICS",
    "aggregate_seeds",
    "bootstrap_metrics",
    "Choice",
    "constrained_choice",
    "Constraint",
    "cost_ccdf",
    "Estimate",
    "format_summary",
    "Frontier",
    "frontier_summary",
    "FrontierInputError",
    "Gap",
    "interpolate_reward",
    "load_frontier_inputs",
    "load_scorer",
    "Loaded",
    "metric_names",
    "pareto_frontier",
    "pareto_indices",
    "parse_constraint",
    "plot_cost_tail",
    "plot_frontier",
    "plot_reward_cost",
    "point_metrics",
    "read_prompts",
    "pool_seeds",
    "read_results",
    "results_files",
    "results_table",
    "reward_gap",
    "run_frontier",
    "SampleScores",
    "score_samples",
    "Scorer",
    "scorer_name",
    "seed_gap",
    "seeds_interval",
    "select_methods",
    "t_interval",
    "tail_metrics",
    "write_results",
]
