"""Results tables, files and plots from metric estimates, and aggregation over seeds.

Dimension legend: N samples, S seeds.

`rows` is `{method: {metric: Estimate(value, low, high)}}`, as `tail_metrics` gives one method's
inner dict. Everything here is host-side NumPy; matplotlib is imported inside the plotting
functions only, so importing `rsa_jax.eval` does not import it, and the figures are drawn on an
Agg canvas (no display, no pyplot global state, the caller's backend left alone).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from rsa_jax.eval.metrics import Estimate, SampleScores, metric_names

Rows = Mapping[str, Mapping[str, Estimate]]

BOOTSTRAP_INTERVAL = "95% percentile cluster bootstrap over prompts"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REWARD_COST_PNG = "reward_cost.png"
COST_TAIL_PNG = "cost_tail.png"


def _estimate(x) -> Estimate:
    """An Estimate from an Estimate, a (value, low, high) sequence or a {value, low, high} dict."""
    if isinstance(x, Mapping):
        return Estimate(float(x["value"]), float(x["low"]), float(x["high"]))
    value, low, high = x
    return Estimate(float(value), float(low), float(high))


def _columns(rows: Rows) -> list[str]:
    """Metric names in report order: the known metrics first, then the rest as first seen."""
    seen = list(dict.fromkeys(name for metrics in rows.values() for name in metrics))
    cvars = sorted((n for n in seen if n.startswith("cost_cvar_")), key=_cvar_level)
    known = metric_names(levels=())
    cut = known.index("worst_prompt_cost")
    ordered = [n for n in known[:cut] if n in seen] + cvars + [n for n in known[cut:] if n in seen]
    return ordered + [name for name in seen if name not in ordered]


def _cvar_level(name: str) -> float:
    try:
        return float(name.removeprefix("cost_cvar_"))
    except ValueError:
        return math.inf


def _format(x: float, digits: int) -> str:
    return f"{x:.{digits}g}"


def results_table(rows: Rows, *, digits: int = 4) -> str:
    """A Markdown table: one row per method, one column per metric, cells `value [low, high]`.

    Args:
      rows: {method: {metric: Estimate}}; a metric missing for a method prints as `-`.
      digits: significant digits of every number.

    Returns:
      The table, lines joined by newlines, ending with a newline.

    Example:
      >>> print(results_table({"dpo": {"cost_mean": Estimate(0.5, 0.4, 0.6)}}), end="")
      | method | cost_mean |
      |---|---|
      | dpo | 0.5 [0.4, 0.6] |
    """
    columns = _columns(rows)
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, metrics in rows.items():
        cells = []
        for name in columns:
            if name not in metrics:
                cells.append("-")
                continue
            value, low, high = _estimate(metrics[name])
            cells.append(
                f"{_format(value, digits)} [{_format(low, digits)}, {_format(high, digits)}]"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | os.PathLike,
    rows: Rows,
    per_sample: Mapping[str, SampleScores] | None = None,
    *,
    interval: str = BOOTSTRAP_INTERVAL,
    plots: bool = True,
) -> dict[str, str]:
    """Write `results.json`, `results.md` and the plots into `out_dir` (created if needed).

    results.json: `{"interval": ..., "metrics": [names], "methods": {method: {metric:
    {"value", "low", "high"}}}}`, plus `"samples": {method: {"num_samples", "num_prompts"}}` when
    `per_sample` is given; `read_results` loads it back. results.md: a title, the interval
    description and `results_table`. reward_cost.png (`plot_reward_cost`) when every method has
    `reward_mean` and `cost_mean`; cost_tail.png (`plot_cost_tail`) when `per_sample` is given.

    Args:
      out_dir: output directory.
      rows: {method: {metric: Estimate}}.
      per_sample: {method: SampleScores} of the same methods, or None.
      interval: what `low`/`high` are; `seeds_interval(S)` for `aggregate_seeds` results.
      plots: False writes the two tables only (many variants, whose one-label-per-point plot
        would be unreadable; `rsa-jax frontier` draws them as frontiers).

    Returns:
      {kind: path} of the files written; kinds `json`, `md`, `reward_cost`, `cost_tail`.
    """
    os.makedirs(out_dir, exist_ok=True)
    columns = _columns(rows)
    payload = {
        "interval": interval,
        "metrics": columns,
        "methods": {
            method: {name: _estimate(est)._asdict() for name, est in metrics.items()}
            for method, metrics in rows.items()
        },
    }
    if per_sample is not None:
        payload["samples"] = {
            method: {"num_samples": len(scores), "num_prompts": scores.num_prompts}
            for method, scores in per_sample.items()
        }
    paths = {
        "json": os.path.join(out_dir, RESULTS_JSON),
        "md": os.path.join(out_dir, RESULTS_MD),
    }
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(f"# Results\n\nIntervals: {interval}.\n\n{results_table(rows)}")
    if plots and rows and all({"reward_mean", "cost_mean"} <= set(m) for m in rows.values()):
        paths["reward_cost"] = os.path.join(out_dir, REWARD_COST_PNG)
        plot_reward_cost(rows, paths["reward_cost"])
    if plots and per_sample:
        paths["cost_tail"] = os.path.join(out_dir, COST_TAIL_PNG)
        plot_cost_tail(per_sample, paths["cost_tail"])
    return paths


def read_results(path: str | os.PathLike) -> dict[str, dict[str, Estimate]]:
    """The rows of a `results.json` written by `write_results` (a file or its directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_JSON)
    with open(path) as f:
        payload = json.load(f)
    return {
        method: {name: _estimate(est) for name, est in metrics.items()}
        for method, metrics in payload["methods"].items()
    }


def aggregate_seeds(seed_rows: Sequence[Rows], *, confidence: float = 0.95) -> dict:
    """Combine the results of S seeds (independent training runs) into one rows dict.

    For each method and metric, with v_1..v_S the seeds' point estimates: `value` = mean(v) and
    `low`/`high` = mean -+ t_{(1+confidence)/2, S-1} * std(v, ddof=1) / sqrt(S), the Student-t
    interval for the mean over seeds (the per-seed bootstrap intervals are not used: the seeds'
    spread already contains the evaluation noise). With S = 1 the single seed's rows are returned
    unchanged (their bootstrap intervals).

    Args:
      seed_rows: S rows dicts with the same methods and metrics.
      confidence: coverage of the t-interval.

    Returns:
      {method: {metric: Estimate}}.
    """
    if not seed_rows:
        raise ValueError("aggregate_seeds needs at least one seed's rows")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    first = seed_rows[0]
    for i, rows in enumerate(seed_rows[1:], start=1):
        if set(rows) != set(first):
            raise ValueError(
                f"seed {i} has methods {sorted(rows)}, seed 0 has {sorted(first)}: "
                "every seed must report the same methods"
            )
        for method, metrics in rows.items():
            if set(metrics) != set(first[method]):
                raise ValueError(
                    f"seed {i} method {method!r} has metrics {sorted(metrics)}, "
                    f"seed 0 has {sorted(first[method])}"
                )
    num_seeds = len(seed_rows)
    if num_seeds == 1:
        return {m: {n: _estimate(e) for n, e in metrics.items()} for m, metrics in first.items()}
    from scipy.special import stdtrit  # scipy is pinned (a jax dependency)

    t = float(stdtrit(num_seeds - 1, (1.0 + confidence) / 2.0))
    out = {}
    for method, metrics in first.items():
        out[method] = {}
        for name in metrics:
            values = np.array([_estimate(rows[method][name]).value for rows in seed_rows])  # [S]
            mean = float(values.mean())
            half = t * float(values.std(ddof=1)) / math.sqrt(num_seeds)
            out[method][name] = Estimate(mean, mean - half, mean + half)
    return out


def seeds_interval(num_seeds: int, confidence: float = 0.95) -> str:
    """The `interval` description of `aggregate_seeds` results, for `write_results`."""
    if num_seeds == 1:
        return BOOTSTRAP_INTERVAL
    return f"{confidence:.0%} Student-t interval of the mean over {num_seeds} seeds"


def _figure(width: float = 6.0, height: float = 4.5):
    """A matplotlib Figure on an Agg canvas (non-interactive, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_reward_cost(
    rows: Rows,
    path: str | os.PathLike,
    *,
    x: str = "cost_mean",
    y: str = "reward_mean",
) -> None:
    """The reward-cost plane: one labelled point per method with x/y error bars from the CIs.

    Args:
      rows: {method: {metric: Estimate}}, each method with metrics `x` and `y`.
      path: output image path (PNG by extension).
      x: metric on the horizontal axis (a cost: left is safer).
      y: metric on the vertical axis (a reward: up is better).
    """
    figure = _figure()
    ax = figure.add_subplot()
    for method, metrics in rows.items():
        missing = [name for name in (x, y) if name not in metrics]
        if missing:
            raise ValueError(f"plot_reward_cost: method {method!r} has no metric {missing}")
        ex, ey = _estimate(metrics[x]), _estimate(metrics[y])
        xerr = [[max(ex.value - ex.low, 0.0)], [max(ex.high - ex.value, 0.0)]]
        yerr = [[max(ey.value - ey.low, 0.0)], [max(ey.high - ey.value, 0.0)]]
        ax.errorbar([ex.value], [ey.value], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=method)
        ax.annotate(method, (ex.value, ey.value), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(f"{x} (lower is safer)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.set_title("Reward vs cost (error bars: confidence intervals)")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def cost_ccdf(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical complementary CDF P(C >= c) at the distinct costs.

    Args:
      cost: [N] sample costs.

    Returns:
      (values [K] ascending distinct costs, prob [K] the fraction of samples with cost >= value);
      prob[0] = 1 and prob[-1] = (count of the largest cost) / N.
    """
    values, counts = np.unique(np.asarray(cost, np.float64), return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [K] samples with cost < value
    return values, (counts.sum() - below) / counts.sum()


def plot_cost_tail(
    per_sample: Mapping[str, SampleScores],
    path: str | os.PathLike,
    *,
    threshold: float | None = None,
) -> None:
    """The cost tail: P(C >= c) per method as a step function on a log y-axis.

    Between two distinct costs u_j < u_{j+1} the curve is P(C >= u_{j+1}) (`where="pre"`), so it is
    exact on (u_j, u_{j+1}]; its lowest level is 1/N.

    Args:
      per_sample: {method: SampleScores}.
      path: output image path.
      threshold: an optional catastrophe threshold drawn as a vertical line.
    """
    figure = _figure()
    ax = figure.add_subplot()
    for method, scores in per_sample.items():
        values, prob = cost_ccdf(scores.cost)
        ax.step(values, prob, where="pre", label=f"{method} (N={len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="catastrophe threshold")
    ax.set_yscale("log")
    ax.set_xlabel("cost c")
    ax.set_ylabel("P(C >= c)")
    ax.set_title("Cost tail (complementary CDF over samples)")
    ax.grid(alpha=0.3, which="both")
    if per_sample:
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
