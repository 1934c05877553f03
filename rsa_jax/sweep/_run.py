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
import logging
import os
import time

import jax

from rsa_jax.sweep._file import Sweep, SweepError, grouped, kernel_label
from rsa_jax.sweep._status import is_done
from rsa_jax.sweep._status import say as _say


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
    from rsa_jax.training import RunDir

    check_data(sweep)
    # The sweep's own directory (results.*) is locked for the whole sweep, both modes; each
    # variant's run directory by whoever trains it (`train`, or `run_vmap` for all of them).
    with RunDir(sweep.run_dir).lock():
        return _run_locked(sweep, evaluate)


def _run_locked(sweep: Sweep, evaluate) -> dict:
    from rsa_jax.sweep._results import collect, write_sweep_results

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
