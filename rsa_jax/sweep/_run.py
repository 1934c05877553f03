"""Running a sweep: every variant through the normal trainer in this process (sequential), or all
at once under `jax.vmap` (`rsa_jax.sweep._vmap`); then the results table and plot.

Sequential variants share the engine's step cache (`rsa_jax.training.Engine.compiled_step`): the
hyperparameters are traced arguments, so variants with the same kernel (loss, risk, version,
split_vocab per stage) and shapes reuse one compiled program. A different risk functional or loss
is a different program, so variants run grouped by kernel and each group starts with its compile.

A variant whose run directory holds a finished final checkpoint made with the same config is
skipped on a rerun; an interrupted one resumes (the trainer resumes from its run directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax

from rsa_jax.config import to_json
from rsa_jax.sweep._file import Sweep, SweepError, Variant, grouped, kernel_label


def _say(message: str) -> None:
    print(message, flush=True)


def has_checkpoints(run_dir: str) -> bool:
    directory = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def is_done(variant: Variant) -> bool:
    """True when the variant's run directory has a readable final checkpoint of its last stage
    marked done. Raises SweepError when that run was made with another config."""
    if not has_checkpoints(variant.run_dir):
        return False
    from rsa_jax.training import Checkpoints, absolute_paths, config_diff

    keep = variant.config.checkpoint.keep
    ckpt = Checkpoints(variant.run_dir, keep=keep, async_save=False, read_only=True)
    try:
        found = ckpt.latest_meta()
    finally:
        ckpt.close()
    if found is None:
        return False
    _, meta = found
    done = bool(meta["done"]) and meta["stage"] == len(variant.config.stages) - 1
    own = json.loads(to_json(absolute_paths(variant.config)))
    if done and (differ := config_diff(meta.get("config") or {}, own)):
        raise SweepError(
            f"variant {variant.name!r}: {variant.run_dir} holds a finished run made with another "
            f"config (differing: {', '.join(differ)}); remove it or give the sweep another run_dir"
        )
    return done


def check_data(sweep: Sweep) -> None:
    """Every variant's data files exist (before the first variant trains)."""
    from rsa_jax.config import stage_data

    for v in sweep.variants:
        for i, stage in enumerate(v.config.stages):
            path = stage_data(v.config, stage).path
            if not os.path.exists(path):
                key = f"stages.{i}.data_path" if stage.data_path else "data.path"
                raise SweepError(f"{sweep.path}: variant {v.name!r}: {key} {path!r} does not exist")


def describe(sweep: Sweep) -> str:
    """The variants, grouped by kernel, with their overrides and run directories (--dry-run)."""
    lines = [
        f"sweep {sweep.path}: {len(sweep.variants)} variant(s), mode {sweep.mode}, "
        f"base {sweep.base}, run_dir {sweep.run_dir}"
    ]
    if sweep.variant_devices is not None:
        lines.append(
            f"  vmap mode: variants over a variant mesh axis of {sweep.variant_devices} devices"
        )
    if sweep.overrides:
        lines.append(f"  shared overrides: {' '.join(sweep.overrides)}")
    groups = grouped(sweep.variants)
    for g, group in enumerate(groups, 1):
        lines.append(
            f"  kernel group {g}/{len(groups)} [{kernel_label(group[0].config)}]: "
            f"{len(group)} variant(s), one compile per distinct stage kernel"
        )
        for v in group:
            lines.append(f"    {v.name}: {' '.join(v.overrides) or '(base)'} -> {v.run_dir}")
    if sweep.eval is not None:
        lines.append(f"  eval: {sweep.eval}")
    return "\n".join(lines)


class _VariantPrefix(logging.Filter):
    def __init__(self, name: str):
        super().__init__()
        self.prefix = f"[{name}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


@contextlib.contextmanager
def variant_log_lines(name: str):
    """Every log line written while a variant trains starts with `[name]`."""
    prefix = _VariantPrefix(name)
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(prefix)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(prefix)


def run_sequential(sweep: Sweep) -> dict[str, str]:
    """Trains every unfinished variant with the trainer, grouped by kernel; {name: status}."""
    from rsa_jax.training import train

    status = {}
    groups = grouped(sweep.variants)
    n, k = len(sweep.variants), 0
    for g, group in enumerate(groups, 1):
        _say(f"kernel group {g}/{len(groups)} [{kernel_label(group[0].config)}]")
        for v in group:
            k += 1
            if is_done(v):
                _say(f"  [{v.name}] ({k}/{n}) finished earlier, skipped")
                status[v.name] = "skipped"
                continue
            _say(f"  [{v.name}] ({k}/{n}) training")
            t0 = time.perf_counter()
            with variant_log_lines(v.name):
                result = train(v.config, label=v.name)
            status[v.name] = result.status
            _say(f"  [{v.name}] ({k}/{n}) {result.status} in {time.perf_counter() - t0:.1f} s")
            if result.status != "done":  # preempted: stop here, a rerun resumes it
                return status
    return status


def run_sweep(sweep: Sweep, *, evaluate=None) -> dict:
    """Trains (skipping finished variants), evaluates when `eval:` is set, writes
    `results.md`, `results.json` and `results.png` to the sweep's run_dir; returns the results.

    `evaluate(options, variant) -> {metric: float}` replaces the `eval:` hook's default
    (`rsa_jax.sweep._eval.evaluate_variant`).
    """
    from rsa_jax.sweep._results import collect, write_sweep_results

    check_data(sweep)
    os.makedirs(sweep.run_dir, exist_ok=True)
    if sweep.mode == "vmap":
        from rsa_jax.sweep._vmap import run_vmap

        status = run_vmap(sweep)
    else:
        status = run_sequential(sweep)
    if any(s == "preempted" for s in status.values()):
        _say("sweep interrupted; rerun the same command to resume")
        return {"status": status}
    evaluations = {}
    if sweep.eval is not None:
        from rsa_jax.sweep._eval import cached_evaluation

        for v in sweep.variants:
            evaluations[v.name] = cached_evaluation(sweep.eval, v, evaluate)
    results = collect(sweep, status, evaluations)
    written = write_sweep_results(sweep.run_dir, results)
    _say(f"wrote {', '.join(sorted(os.path.basename(p) for p in written))} to {sweep.run_dir}")
    trackers = [t for t in sweep.variants[0].config.train.report_to if t != "tensorboard"]
    if trackers and jax.process_index() == 0:  # the results table and plot, as artifacts
        from rsa_jax.training import log_artifacts

        log_artifacts(trackers, sweep.run_dir, list(written), folder="sweep")
    return results
