"""The sweep's `eval:` hook: after training, each variant's final policy is evaluated and the
metrics join its row of the results table.

```yaml
eval:
  task: safety            # the synthetic task's exact oracles and held-out prompts (rsa_jax.tasks)
  # or: scorer: my.module:scorer  and  prompts: prompts.jsonl   (a user Scorer, rsa_jax.eval)
  samples: 16             # responses per prompt
  max_new_tokens: 32
  reference: runs/sft     # optional: a model (HF or run directory) for the KL estimate
  seed: 0
  n_boot: 200             # bootstrap resamples for the intervals (kept in eval.json)
  # fn: my.module:evaluate  # replaces all of the above: fn(run_dir, config, **options) -> metrics
```

The metrics are `rsa_jax.eval.tail_metrics` (reward, cost, CVaR of the cost, catastrophe rate,
worst-prompt cost, KL with a reference). Each variant's result is cached in
`<run_dir>/<variant>/eval.json` with the options it was made with; a rerun with the same options
reuses it.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from rsa_jax.sweep._file import SweepError, Variant

OPTIONS = (
    "task",
    "scorer",
    "prompts",
    "template",
    "samples",
    "max_new_tokens",
    "reference",
    "seed",
    "n_boot",
)


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise SweepError(f"eval.fn: {spec!r} is not of the form package.module:attr")
    target = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def evaluate_variant(options: dict, variant: Variant) -> dict:
    """{metric: {value, low, high}} of the variant's final policy (`rsa_jax.eval`)."""
    import numpy as np

    from rsa_jax.eval import evaluate_model, load_model, load_scorer, read_prompts, tail_metrics

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SweepError(f"eval: unknown option(s) {unknown} (allowed: {OPTIONS} or fn)")
    if options.get("task") == "safety":
        from rsa_jax.tasks import TEMPLATE, OracleScorer, SafetyTask

        task = SafetyTask()
        scorer = OracleScorer(task)
        prompts = task.split_prompts(seed=0)[1]
        template = options.get("template", TEMPLATE)
    elif options.get("task") is not None:
        raise SweepError(f"eval.task: only 'safety' is known, got {options['task']!r}")
    else:
        if not (options.get("scorer") and options.get("prompts")):
            raise SweepError("eval: give task: safety, or scorer: module:attr and prompts: FILE")
        scorer = load_scorer(options["scorer"])
        template = options.get("template")
    if options.get("prompts"):
        try:
            prompts = read_prompts(options["prompts"])
        except (OSError, ValueError) as e:
            raise SweepError(f"eval.prompts: {e}") from None
    model, tokenizer = load_model(variant.run_dir)
    reference = load_model(options["reference"])[0] if options.get("reference") else None
    seed = int(options.get("seed", 0))
    scores, _ = evaluate_model(
        model,
        tokenizer,
        prompts,
        scorer,
        reference=reference,
        n=int(options.get("samples", 16)),
        max_new_tokens=int(options.get("max_new_tokens", 32)),
        seed=seed,
        template=template,
    )
    metrics = tail_metrics(scores, n_boot=int(options.get("n_boot", 200)), seed=seed)
    return {
        k: dict(value=float(e.value), low=float(e.low), high=float(e.high))
        for k, e in metrics.items()
        if np.isfinite(e.value)
    }


def _values(metrics: dict) -> dict[str, float]:
    """{metric: value} from values, Estimates or {value, low, high} mappings."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            v = v["value"]
        elif hasattr(v, "value"):
            v = v.value
        out[k] = float(v)
    return out


def cached_evaluation(options: dict, variant: Variant, evaluate=None) -> dict[str, float]:
    """The variant's eval metrics (values), computed once per set of options (eval.json)."""
    from rsa_jax.training import RunDir

    path = RunDir(variant.run_dir).eval_file
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("options") == options:
            return _values(saved["metrics"])
    if evaluate is None and "fn" in options:
        fn = _load(options["fn"])
        rest = {k: v for k, v in options.items() if k != "fn"}
        metrics = fn(variant.run_dir, variant.config, **rest)
    elif evaluate is not None:
        metrics = evaluate(options, variant)
    else:
        metrics = evaluate_variant(options, variant)
    metrics = {
        k: (v if isinstance(v, dict) else {"value": v.value, "low": v.low, "high": v.high})
        if isinstance(v, dict) or hasattr(v, "value")
        else float(v)
        for k, v in metrics.items()
    }
    with open(path, "w") as f:
        json.dump({"options": options, "metrics": metrics}, f, indent=2)
    return _values(metrics)
