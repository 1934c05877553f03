"""The sweep's results: one row per variant with its overrides, the last logged training metrics
of every stage (from its `metrics.jsonl`) and, when `eval:` is set, the evaluation's metrics;
written as `results.md`, `results.json` and a bar plot `results.png`.

matplotlib is imported inside `plot_results` only and draws on an Agg canvas (no display, no
pyplot state).
"""

from __future__ import annotations

import json
import os

from rsa_jax.sweep._file import Sweep
from rsa_jax.training import read_metrics

# Training metrics reported per variant (TRL names, as logged by the trainer).
TRAIN_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "kl/chosen",
    "kl/rejected",
)


def last_records(run_dir: str) -> dict[int, dict]:
    """{stage: last logged record of that stage} from `run_dir/metrics.jsonl` ({} if absent);
    a held-out evaluation's record (`eval/*`, train.eval_every) joins the training record of
    its step."""
    from rsa_jax.training import RunDir

    path = RunDir(run_dir).metrics_file
    out: dict[int, dict] = {}
    for number, record in enumerate(read_metrics(path), start=1):
        try:
            stage, step = int(record["stage"]), int(record["step"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: record {number} has no integer stage and step") from None
        if stage in out and step == out[stage]["step"]:
            out[stage] = {**out[stage], **record}  # an eval/* record of the same step
        elif stage not in out or step > out[stage]["step"]:
            out[stage] = record
    return out


def collect(sweep: Sweep, status: dict[str, str], evaluations: dict[str, dict]) -> dict:
    """The results document: sweep settings and one entry per variant."""
    rows = []
    for v in sweep.variants:
        records = last_records(v.run_dir)
        stages = [
            {
                "stage": i,
                "name": v.config.stages[i].name,
                **{k: records[i][k] for k in TRAIN_METRICS if k in records.get(i, {})},
            }
            for i in range(len(v.config.stages))
        ]
        rows.append(
            dict(
                name=v.name,
                label=v.label,
                overrides=list(v.overrides),
                run_dir=v.run_dir,
                status=status.get(v.name, "not run"),
                final=stages[-1],
                stages=stages,
                eval=evaluations.get(v.name, {}),
            )
        )
    return dict(
        sweep=sweep.path,
        base=sweep.base,
        mode=sweep.mode,
        shared_overrides=list(sweep.overrides),
        eval=sweep.eval,
        variants=rows,
    )


def _cell(x) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def sweep_table(results: dict) -> str:
    """Markdown: variant, overrides, each stage's final loss, the last stage's metrics, eval."""
    rows = results["variants"]
    n_stages = max((len(r["stages"]) for r in rows), default=0)
    final_keys = [k for k in TRAIN_METRICS if k != "loss"]
    eval_keys = list(dict.fromkeys(k for r in rows for k in r["eval"]))
    header = ["variant", "overrides"] + [f"loss s{i}" for i in range(n_stages)]
    header += [f"{k} (last)" for k in final_keys] + [f"eval {k}" for k in eval_keys]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        cells = [r["name"], " ".join(f"`{o}`" for o in r["overrides"]) or "(base)"]
        cells += [_cell(s.get("loss")) for s in r["stages"]]
        cells += ["-"] * (n_stages - len(r["stages"]))
        cells += [_cell(r["final"].get(k)) for k in final_keys]
        cells += [_cell(r["eval"].get(k)) for k in eval_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: str) -> str:
    """Bars per variant: final loss and reward accuracy of the last stage, and the first eval
    metrics (up to two) when an evaluation ran."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = results["variants"]
    names = [r["name"] for r in rows]
    panels = [("final loss", "loss"), ("reward accuracy", "rewards/accuracies")]
    eval_keys = list(dict.fromkeys(k for r in rows for k in r["eval"]))
    panels += [(f"eval {k}", k) for k in eval_keys[:2]]
    fig = Figure(figsize=(max(6.0, 0.5 * len(names) + 3), 2.6 * len(panels)))
    FigureCanvasAgg(fig)
    for p, (title, key) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        source = "eval" if title.startswith("eval ") else "final"
        values = [r[source].get(key, float("nan")) for r in rows]
        ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names if p == len(panels) - 1 else [], rotation=30, ha="right")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_sweep_results(run_dir: str, results: dict) -> list[str]:
    """results.json, results.md and results.png in `run_dir`; returns the paths written."""
    os.makedirs(run_dir, exist_ok=True)
    out = [os.path.join(run_dir, n) for n in ("results.json", "results.md", "results.png")]
    with open(out[0], "w") as f:
        json.dump(results, f, indent=2)
    with open(out[1], "w") as f:
        f.write(f"# Sweep {results['sweep']} ({results['mode']})\n\n")
        f.write(f"Base `{results['base']}`")
        if results["shared_overrides"]:
            f.write(", shared overrides " + " ".join(f"`{o}`" for o in results["shared_overrides"]))
        f.write(". Metrics are the last logged step of each stage.\n\n")
        f.write(sweep_table(results))
    plot_results(results, out[2])
    return out
