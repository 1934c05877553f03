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
reuses it. Each sample's text and scores are in `<run_dir>/<variant>/samples.jsonl`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from typing import Any

from rsa_jax.sweep._file import SweepError, Variant

log = logging.getLogger(__name__)

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
    module, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module or not attr:
        raise SweepError(f"eval.fn: {spec!r} is not of the form package.module:attr")
    try:
        target = importlib.import_module(module)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise SweepError(f"eval.fn: {spec!r} cannot be imported ({e})") from None
    return target


# Integer options and their least value.
_COUNTS = {"samples": 1, "max_new_tokens": 1, "seed": 0, "n_boot": 1}


def _inputs(options: dict) -> tuple[Any, list[str], str | None]:
    """(scorer, prompts, template) of the options; SweepError naming the eval key otherwise."""
    from rsa_jax.eval import load_scorer, read_prompts

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SweepError(f"eval: unknown option(s) {unknown} (allowed: {OPTIONS} or fn)")
    for key, least in _COUNTS.items():
        value = options.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SweepError(f"eval.{key}: must be an integer >= {least}, got {value!r}")
    reference = options.get("reference")
    if reference is not None and not (isinstance(reference, str) and os.path.isdir(reference)):
        raise SweepError(f"eval.reference: {reference!r} is not a directory (a run or HF model)")
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
        try:
            scorer = load_scorer(str(options["scorer"]))
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            raise SweepError(f"eval.scorer: {e}") from None
        template = options.get("template")
    if options.get("prompts"):
        try:
            prompts = read_prompts(str(options["prompts"]))
        except (OSError, ValueError) as e:
            raise SweepError(f"eval.prompts: {e}") from None
    return scorer, prompts, template


def check_eval(options: dict | None, where: str) -> None:
    """Everything the `eval:` hook needs (its options, the scorer's import, the prompt file,
    the reference), checked before the first variant trains and by `--dry-run`; SweepError
    naming `where` (the sweep file) and the eval key otherwise."""
    if options is None:
        return
    try:
        if "fn" in options:
            _load(options["fn"])
        else:
            _inputs(options)
    except SweepError as e:
        raise SweepError(f"{where}: {e}") from None


def evaluate_variant(options: dict, variant: Variant) -> dict:
    """{metric: {value, low, high}} of the variant's final policy (`rsa_jax.eval`)."""
    import numpy as np

    from rsa_jax.eval import (
        evaluate_model,
        load_model,
        quantized_base_of,
        sample_rows,
        tail_metrics,
        write_samples,
    )

    scorer, prompts, template = _inputs(options)
    model, tokenizer = load_model(variant.run_dir)
    reference = None
    if options.get("reference"):
        storage = quantized_base_of(variant.run_dir, options["reference"])
        if storage is not None:  # the float base: KL would mostly measure the quantization
            log.info(
                "[%s] KL reference: the run's %s base with its adapters off (the model it "
                "started from), not the float %s",
                variant.name,
                storage,
                options["reference"],
            )
            reference = load_model(variant.run_dir, adapters_off=True)[0]
        else:
            reference = load_model(options["reference"])[0]
    seed = int(options.get("seed", 0))
    scores, samples = evaluate_model(
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
    # Every sample's text and scores beside eval.json, as `rsa-jax eval` writes them.
    write_samples(variant.run_dir, sample_rows(variant.name, prompts, samples, scores))
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
    saved = _read_cache(path)
    if saved is not None and saved.get("options") == options:
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
    tmp = f"{path}.tmp-{os.getpid()}"  # complete or absent: a kill never leaves half a file
    with open(tmp, "w") as f:
        json.dump({"options": options, "metrics": metrics}, f, indent=2)
    os.replace(tmp, path)
    return _values(metrics)


def _read_cache(path: str) -> dict | None:
    """The saved evaluation of `path`, or None when absent or unreadable (a torn or edited
    file is recomputed, with a warning, rather than failing the sweep)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable (%s); evaluating again", path, e)
        return None
    metrics = saved.get("metrics") if isinstance(saved, dict) else None
    try:
        if isinstance(metrics, dict):
            _values(metrics)
            return saved
    except (KeyError, TypeError, ValueError):
        pass
    log.warning("%s: not an evaluation cache (no metrics); evaluating again", path)
    return None
