"""`rsa-jax frontier`: frontiers, paired reward gaps and constrained optima from results files.

The variants of every seed are pooled per (method, variant): the mean over the seeds that have
it with a Student-t interval across seeds (one seed: its prompt-bootstrap interval). The frontier
tables, the plots and Algorithm 1's choice use these pooled points; the reward gaps are paired
per seed (`rsa_jax.eval._frontier.seed_gap`). Plots are drawn on an Agg canvas, as in
`rsa_jax.eval.report`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence

from rsa_jax.eval._frontier import (
    FRONTIER_STATISTICS,
    REWARD,
    Choice,
    Constraint,
    Frontier,
    Gap,
    constrained_choice,
    gap_verdict,
    pareto_frontier,
    parse_constraint,
    seed_gap,
)
from rsa_jax.eval._frontier_io import Loaded, load_frontier_inputs, select_methods
from rsa_jax.eval.metrics import Estimate
from rsa_jax.eval.report import _figure, aggregate_seeds, seeds_interval

FRONTIER_JSON = "frontier.json"
FRONTIER_MD = "frontier.md"

# method -> variant -> metric -> Estimate
Pooled = dict[str, dict[str, dict[str, Estimate]]]


def pool_seeds(loaded: Loaded, notes: list[str] | None = None) -> tuple[Pooled, str]:
    """(method -> variant -> metric -> Estimate over seeds, the interval's description).

    A (method, variant) missing from some seed is pooled over the seeds that have it (noted); a
    metric missing from some of those seeds is left out for that variant.
    """
    groups: dict[tuple[str, str], list[dict[str, Estimate]]] = {}
    for per_seed in loaded.seeds.values():
        for method, variants in per_seed.items():
            for variant, metrics in variants.items():
                groups.setdefault((method, variant), []).append(metrics)
    num_seeds = len(loaded.seeds)
    pooled: Pooled = {}
    for (method, variant), runs in groups.items():
        common = set.intersection(*(set(r) for r in runs))
        rows = [{"x": {k: r[k] for k in sorted(common)}} for r in runs]
        pooled.setdefault(method, {})[variant] = aggregate_seeds(rows)["x"]
        if len(runs) < num_seeds and notes is not None:
            notes.append(f"{method} {variant}: in {len(runs)} of {num_seeds} seeds")
    return pooled, seeds_interval(num_seeds)


def _fmt(e: Estimate | None, digits: int = 4) -> str:
    if e is None:
        return "-"
    if math.isnan(e.low):
        return f"{e.value:.{digits}g}"
    return f"{e.value:.{digits}g} [{e.low:.{digits}g}, {e.high:.{digits}g}]"


def _estimate_json(e: Estimate | None):
    return None if e is None else e._asdict()


def _frontier_json(f: Frontier | None):
    if f is None:
        return None
    return {
        "points": [
            {"variant": n, "cost": c._asdict(), "reward": r._asdict()}
            for n, c, r in zip(f.names, f.cost, f.reward, strict=True)
        ],
        "dominated": list(f.dominated),
    }


def _choice_json(c: Choice) -> dict:
    return {
        "constraint": str(c.constraint),
        "variant": c.variant,
        "reward": _estimate_json(c.reward),
        "statistic": _estimate_json(c.statistic),
        "safe_set": list(c.safe),
        "closest_if_empty": c.closest,
        "missing": list(c.missing),
        "tied_with": list(c.tied) if c.has_interval else None,
    }


def _gap_json(g: Gap) -> dict:
    return {
        "a": g.a,
        "b": g.b,
        "statistic": g.statistic,
        "gap": _estimate_json(g.estimate),
        "per_seed": g.per_seed,
        "skipped": g.skipped,
        "verdict": gap_verdict(g),
    }


def frontier_summary(
    loaded: Loaded,
    constraints: Sequence[Constraint] = (),
    *,
    statistics: Sequence[str] = FRONTIER_STATISTICS,
    reward: str = REWARD,
) -> dict:
    """Everything `rsa-jax frontier` reports, as a JSON-ready dict.

    Keys: `interval` (of the pooled points), `seeds`, `statistics` (those present in the
    results), `frontiers` {statistic: {method: frontier or None}}, `gaps` [one per statistic and
    ordered pair of methods], `choices` {constraint: {method: choice}}, `notes`, and the private
    `_pooled` / `_frontiers` objects for plotting.
    """
    notes = list(loaded.notes)
    pooled, interval = pool_seeds(loaded, notes)
    present = {k for variants in pooled.values() for m in variants.values() for k in m}
    stats = [s for s in statistics if s in present]
    for s in statistics:
        if s not in present:
            notes.append(f"no variant has {s}; its frontier is left out")
    for s in list(stats):
        values = {m[s].value for variants in pooled.values() for m in variants.values() if s in m}
        if len(values) == 1:  # every variant alike (all costs 0): nothing to trade off
            stats.remove(s)
            notes.append(
                f"{s} is {values.pop():.4g} for every variant; its frontier and gaps are left out"
            )
    for constraint in constraints:
        if constraint.statistic not in present:
            raise ValueError(
                f"constraint {constraint}: no variant has {constraint.statistic!r}; the results "
                f"have {sorted(present)}"
            )
    methods = list(pooled)
    frontiers = {
        s: {m: pareto_frontier(pooled[m], s, reward=reward) for m in methods} for s in stats
    }
    gaps = [
        seed_gap(loaded.seeds, a, b, s, reward=reward)
        for s in stats
        for a, b in itertools.combinations(methods, 2)
    ]
    choices = {
        str(c): {m: constrained_choice(pooled[m], c, reward=reward) for m in methods}
        for c in constraints
    }
    return {
        "interval": interval,
        "seeds": sorted(loaded.seeds, key=lambda s: (len(s), s)),
        "files": list(loaded.files),
        "reward": reward,
        "statistics": stats,
        "frontiers": {
            s: {m: _frontier_json(f) for m, f in per.items()} for s, per in frontiers.items()
        },
        "gaps": [_gap_json(g) for g in gaps],
        "choices": {
            c: {m: _choice_json(ch) for m, ch in per.items()} for c, per in choices.items()
        },
        "notes": notes,
        "_pooled": pooled,
        "_frontiers": frontiers,
        "_gaps": gaps,
        "_choices": choices,
    }


def format_summary(summary: dict) -> str:
    """The summary as Markdown: frontier tables, reward gaps, constrained optima, notes."""
    reward = summary["reward"]
    lines = [
        f"# Reward-cost frontiers ({len(summary['seeds'])} seed(s))",
        "",
        f"Points: {summary['interval']}. Frontier variants by increasing cost; "
        "dominated variants listed after.",
    ]
    for s, fronts in summary["_frontiers"].items():
        lines += ["", f"## {reward} vs {s}", "", f"| method | variant | {s} | {reward} |"]
        lines.append("|---|---|---|---|")
        for method, f in fronts.items():
            if f is None:
                lines.append(f"| {method} | (no variant with both metrics) | - | - |")
                continue
            for n, c, r in zip(f.names, f.cost, f.reward, strict=True):
                lines.append(f"| {method} | {n} | {_fmt(c)} | {_fmt(r)} |")
            if f.dominated:
                lines.append(f"| {method} | dominated: {', '.join(f.dominated)} | | |")
    gaps: list[Gap] = summary["_gaps"]
    compared = [g for g in gaps if g.per_seed]
    if compared:
        lines += [
            "",
            "## Reward gap at equal cost",
            "",
            "Mean of R_a(c) - R_b(c) over the overlapping range of c along the two frontiers, "
            "per seed; mean and t-interval across seeds (no interval with one seed).",
            "",
            "| statistic | a - b | gap | seeds | per seed | seeds not compared |",
            "|---|---|---|---|---|---|",
        ]
        for g in compared:
            per = ", ".join(f"{k}: {v:+.4g}" for k, v in g.per_seed.items())
            lines.append(
                f"| {g.statistic} | {g.a} - {g.b} | {_fmt(g.estimate)} | {len(g.per_seed)} | "
                f"{per} | {', '.join(g.skipped) or '-'} |"
            )
    if compared:
        lines += ["", f"Verdicts ({summary['interval']}):", ""]
        lines += [f"- {g.statistic}: {g.a} - {g.b}: {gap_verdict(g)}" for g in compared]
    never = [f"{g.statistic}: {g.a} - {g.b}" for g in gaps if not g.per_seed]
    if never:
        lines += [
            "",
            "No gap (no seed where both frontiers exist and their cost ranges overlap; the "
            "reason per seed is in frontier.json): " + "; ".join(never) + ".",
        ]
    for constraint, per in summary["_choices"].items():
        lines += [
            "",
            f"## Constrained optimum: {constraint} (upper confidence bound)",
            "",
            f"| method | chosen variant | {reward} | statistic | safe set |",
            "|---|---|---|---|---|",
        ]
        for method, c in per.items():
            if c.variant is None:
                closest = f"; lowest upper bound: {c.closest}" if c.closest else ""
                lines.append(f"| {method} | EMPTY SAFE SET{closest} | - | - | 0 variants |")
            else:
                lines.append(
                    f"| {method} | {c.variant} | {_fmt(c.reward)} | {_fmt(c.statistic)} | "
                    f"{len(c.safe)} variant(s) |"
                )
        verdicts = [_choice_verdict(method, c) for method, c in per.items() if c.variant]
        if verdicts:
            lines += ["", *verdicts]
    if summary["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in summary["notes"]]]
    return "\n".join(lines) + "\n"


def _choice_verdict(method: str, c: Choice) -> str:
    if not c.has_interval:
        return f"- {method}: {c.variant}: its reward has no interval, so no verdict"
    if len(c.safe) == 1:
        return f"- {method}: {c.variant} is the only safe variant"
    if c.tied:
        return (
            f"- {method}: {c.variant} is tied with {', '.join(c.tied)} (reward intervals "
            "overlap: not distinguishable at this confidence)"
        )
    return f"- {method}: {c.variant} has a higher reward than every other safe variant"


def plot_frontier(pooled: Pooled, statistic: str, path: str, *, reward: str = REWARD) -> None:
    """Reward against one cost statistic: every variant (faint, with interval bars) and each
    method's frontier (a line through its frontier points)."""
    figure = _figure(6.5, 4.8)
    ax = figure.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(pooled))]
    for color, (method, variants) in zip(colors, pooled.items(), strict=True):
        front = pareto_frontier(variants, statistic, reward=reward)
        if front is None:
            continue
        for metrics in variants.values():
            if statistic not in metrics or reward not in metrics:
                continue
            c, r = metrics[statistic], metrics[reward]
            xerr, yerr = _err(c), _err(r)
            ax.errorbar(
                [c.value], [r.value], xerr=xerr, yerr=yerr, fmt="o", color=color, alpha=0.3, ms=4
            )
        ax.plot(
            front.cost_values,
            front.reward_values,
            "-o",
            color=color,
            label=f"{method} ({len(front.names)}/{len(variants)} on frontier)",
        )
    ax.set_xlabel(f"{statistic} (lower is better)")
    ax.set_ylabel(f"{reward} (higher is better)")
    ax.set_title(f"Reward vs {statistic}: frontiers (bars: confidence intervals)")
    ax.grid(alpha=0.3)
    if pooled:
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def _err(e: Estimate):
    if math.isnan(e.low):
        return None
    return [[max(e.value - e.low, 0.0)], [max(e.high - e.value, 0.0)]]


def run_frontier(
    paths: Sequence[str],
    constraints: Sequence[str] = (),
    *,
    out: str | None = None,
    methods: Sequence[str] = (),
    method_keys: Sequence[str] = (),
    statistics: Sequence[str] = FRONTIER_STATISTICS,
) -> int:
    """The `rsa-jax frontier` command: prints the report; with `out`, writes frontier.md,
    frontier.json and one `frontier_<statistic>.png` per statistic. Returns the exit status: 0,
    or 2 after printing the reason when an input or a constraint is bad."""
    import sys

    try:
        return _run(paths, constraints, out, methods, method_keys, statistics)
    except ValueError as e:  # FrontierInputError, a bad constraint, no such metric
        print(f"rsa-jax frontier: {e}", file=sys.stderr)
        return 2


def _run(paths, constraints, out, methods, method_keys, statistics) -> int:
    parsed = [parse_constraint(c) for c in constraints]
    loaded = load_frontier_inputs(paths, method_keys=method_keys)
    if methods:
        loaded = select_methods(loaded, methods)
    if not any(loaded.seeds.values()):
        raise ValueError(f"{', '.join(paths)}: no evaluated variants found")
    summary = frontier_summary(loaded, parsed, statistics=statistics)
    text = format_summary(summary)
    print(text, end="")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, FRONTIER_MD), "w") as f:
            f.write(text)
        with open(os.path.join(out, FRONTIER_JSON), "w") as f:
            public = {k: v for k, v in summary.items() if not k.startswith("_")}
            json.dump(public, f, indent=2)
            f.write("\n")
        written = [FRONTIER_MD, FRONTIER_JSON]
        for s in summary["statistics"]:
            name = f"frontier_{s}.png"
            plot_frontier(summary["_pooled"], s, os.path.join(out, name), reward=summary["reward"])
            written.append(name)
        print(f"wrote {', '.join(written)} to {out}")
    return 0
