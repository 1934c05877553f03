"""Evaluation: per-sample scores to tail-risk metrics, tables and plots.

`scorers` turns (prompt, response) texts into per-sample rewards, costs and catastrophe flags
(`Scorer`, `load_scorer`, `score_samples`); `metrics` turns `SampleScores` into metrics with
prompt-clustered bootstrap intervals (`tail_metrics`); `report` writes `results.json`,
`results.md` and the reward-cost and cost-tail plots, and aggregates seeds; the frontier modules
compare methods through families of variants (Pareto frontiers of reward against each cost
statistic, the paired reward gap at equal cost, Algorithm 1's constrained choice, and
`run_frontier`, the `rsa-jax frontier` command). `write_samples` writes each sample's text
with its scores as JSON Lines. All NumPy. `prompt_sets` loads the shipped real prompt
sets, `judges` the refusal judge and (with JAX, on first use) the score models; both are
imported as submodules (`rsa_jax.eval.judges`).

The driver that produces the per-sample arrays (`load_model`, `sample`, `response_logprob`,
`evaluate_model`, on one device or a mesh: `Placement`, `placement_for`; batch sizes from a memory
budget) needs JAX and the model code: its names are re-exported lazily (on first access), so
importing `rsa_jax.eval` for the metrics and reports does not import JAX.
"""

import importlib
from typing import TYPE_CHECKING

from rsa_jax.eval._categories import RecordingScorer, annotate, category_metrics, subset_scores
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
from rsa_jax.eval._samples_file import SAMPLES_JSONL, read_samples, sample_rows, write_samples
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

# name -> private module: imported on first access (module __getattr__, PEP 562).
_LAZY = {
    "Samples": "rsa_jax.eval._evaluate",
    "encode_prompts": "rsa_jax.eval._evaluate",
    "evaluate_model": "rsa_jax.eval._evaluate",
    "response_logprob": "rsa_jax.eval._evaluate",
    "sample": "rsa_jax.eval._evaluate",
    "PROMPT_SLOTS": "rsa_jax.eval._evaluate",
    "sampling_call": "rsa_jax.eval._evaluate",
    "sampling_rows": "rsa_jax.eval._evaluate",
    "DEVICE_FRACTION": "rsa_jax.eval._budget",
    "Placement": "rsa_jax.eval._placement",
    "load_model": "rsa_jax.eval._placement",
    "mesh_from_text": "rsa_jax.eval._placement",
    "placement_for": "rsa_jax.eval._placement",
    "placement_of": "rsa_jax.eval._placement",
    "quantized_base_of": "rsa_jax.eval._placement",
    "source_template": "rsa_jax.eval._placement",
    "default_memory_budget": "rsa_jax.eval._budget",
    "rows_per_batch": "rsa_jax.eval._budget",
    "sampling_bytes_per_row": "rsa_jax.eval._budget",
    "scoring_bytes_per_row": "rsa_jax.eval._budget",
}

if TYPE_CHECKING:  # the lazy names, for type checkers (imported on first use at run time)
    from rsa_jax.eval._budget import (
        DEVICE_FRACTION,
        default_memory_budget,
        rows_per_batch,
        sampling_bytes_per_row,
        scoring_bytes_per_row,
    )
    from rsa_jax.eval._evaluate import (
        PROMPT_SLOTS,
        Samples,
        encode_prompts,
        evaluate_model,
        response_logprob,
        sample,
        sampling_call,
        sampling_rows,
    )
    from rsa_jax.eval._placement import (
        Placement,
        load_model,
        mesh_from_text,
        placement_for,
        placement_of,
        quantized_base_of,
        source_template,
    )


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rsa_jax.eval' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Samples",
    "encode_prompts",
    "evaluate_model",
    "response_logprob",
    "sample",
    "PROMPT_SLOTS",
    "sampling_call",
    "sampling_rows",
    "DEVICE_FRACTION",
    "Placement",
    "load_model",
    "mesh_from_text",
    "placement_for",
    "placement_of",
    "quantized_base_of",
    "source_template",
    "default_memory_budget",
    "rows_per_batch",
    "sampling_bytes_per_row",
    "scoring_bytes_per_row",
    "RecordingScorer",
    "annotate",
    "category_metrics",
    "subset_scores",
    "DEFAULT_LEVELS",
    "FRONTIER_STATISTICS",
    "SAMPLES_JSONL",
    "Estimate",
    "SampleScores",
    "Scorer",
    "aggregate_seeds",
    "bootstrap_metrics",
    "Choice",
    "constrained_choice",
    "Constraint",
    "cost_ccdf",
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
    "read_samples",
    "sample_rows",
    "point_metrics",
    "read_prompts",
    "pool_seeds",
    "read_results",
    "results_files",
    "results_table",
    "reward_gap",
    "run_frontier",
    "score_samples",
    "scorer_name",
    "seed_gap",
    "seeds_interval",
    "select_methods",
    "t_interval",
    "tail_metrics",
    "write_results",
    "write_samples",
]
