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

from rsa_jax.config import ConfigError, to_json
from rsa_jax.sweep._file import Sweep, SweepError, Variant, grouped, kernel_label
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


def check_sweep(sweep: Sweep) -> None:
    """What must hold before the first variant trains (`--dry-run` checks it too): every
    variant's data files exist, and the `eval:` hook's scorer imports, its prompt file reads
    and its options are valid; in vmap mode, the variants differ only in traced
    hyperparameters. Every variant's config was validated by `load_sweep`."""
    from rsa_jax.sweep._eval import check_eval

    check_data(sweep)
    if sweep.mode == "vmap":  # one program for all: only traced hyperparameters may differ
        from rsa_jax.sweep._vmap import check_vmappable

        try:
            check_vmappable(list(sweep.variants))
        except SweepError as e:
            raise SweepError(f"{sweep.path}: {e}") from None
    check_eval(sweep.eval, sweep.path)


class SweepEvalError(RuntimeError):
    """The evaluation failed after the variants trained (their checkpoints are kept: a rerun
    skips them and evaluates again). Not a config error: work was done."""


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


def run_sequential(sweep: Sweep, stop=None) -> dict[str, str]:
    """Trains every unfinished variant with the trainer, grouped by kernel; {name: status}.
    `stop` (a `StopSignal`): a signal ends the variant training now (saved, "preempted") and
    the sweep after it."""
    from rsa_jax.training import StopSignal, train

    stop = StopSignal() if stop is None else stop
    status = {}
    finished: list[Variant] = []  # whose stage policies later variants may start from
    groups = grouped(sweep.variants)
    n, k = len(sweep.variants), 0
    for g, group in enumerate(groups, 1):
        _say(f"kernel group {g}/{len(groups)} [{kernel_label(group[0].config)}]")
        for v in group:
            k += 1
            if is_done(v):
                _say(f"  [{v.name}] ({k}/{n}) finished earlier, skipped")
                status[v.name] = "skipped"
                finished.append(v)
                continue
            if stop.should_stop():
                status[v.name] = "preempted"
                return status
            shared = _shared_source(v, finished)
            if shared is not None:
                _say(
                    f"  [{v.name}] ({k}/{n}) training; stages 0..{shared[1] - 1} as in "
                    f"{os.path.basename(shared[0])} (the same config): not trained again"
                )
            else:
                _say(f"  [{v.name}] ({k}/{n}) training")
            t0 = time.perf_counter()
            with variant_log_lines(v.name):
                result = train(v.config, label=v.name, stop=stop, shared_from=shared)
            status[v.name] = result.status
            if result.status == "done":
                finished.append(v)
            _say(f"  [{v.name}] ({k}/{n}) {result.status} in {time.perf_counter() - t0:.1f} s")
            if result.status != "done":  # preempted: stop here, a rerun resumes it
                return status
    return status


def _prefix_key(config, k: int) -> str:
    """Everything that shapes the first k stages of a run (its run directory aside)."""
    import dataclasses

    train = dataclasses.replace(config.train, run_dir="")
    return to_json(dataclasses.replace(config, stages=config.stages[:k], train=train))


def _shared_source(variant: Variant, finished: list[Variant]) -> tuple[str, int] | None:
    """(run directory, k) of a finished variant whose first k stages (k as large as possible,
    the last stage never) are this variant's, with its stage k-1 policy on disk; else None.
    The vmap sweep's `shared_stages`, for the sequential mode."""
    from rsa_jax.training import stage_policy_dir

    last = len(variant.config.stages) - 1
    for k in range(last, 0, -1):
        key = _prefix_key(variant.config, k)
        for u in finished:
            if len(u.config.stages) < k or _prefix_key(u.config, k) != key:
                continue
            if os.path.isdir(stage_policy_dir(u.run_dir, k - 1)):
                return u.run_dir, k
    return None


def run_sweep(sweep: Sweep, *, evaluate=None, stop=None) -> dict:
    """Trains (skipping finished variants), evaluates when `eval:` is set, writes
    `results.md`, `results.json` and `results.png` to the sweep's run_dir; returns the results.

    `evaluate(options, variant) -> {metric: float}` replaces the `eval:` hook's default
    (`rsa_jax.sweep._eval.evaluate_variant`). `stop`: the `StopSignal` (the CLI passes one
    that saw signals during its imports); SIGTERM/SIGINT end the sweep with
    `{"status": {...}}` and a "preempted" variant, whose rerun resumes.
    """
    from rsa_jax.training import RunDir, StopSignal

    stop = StopSignal() if stop is None else stop
    check_sweep(sweep)
    # The sweep's own directory (results.*) is locked for the whole sweep, both modes; each
    # variant's run directory by whoever trains it (`train`, or `run_vmap` for all of them).
    with stop.installed(), RunDir(sweep.run_dir).lock():
        return _run_locked(sweep, evaluate, stop)


def _run_locked(sweep: Sweep, evaluate, stop) -> dict:
    from rsa_jax.sweep._results import collect, write_sweep_results

    if sweep.mode == "vmap":
        from rsa_jax.sweep._vmap import run_vmap

        status = run_vmap(sweep, stop=stop)
    else:
        status = run_sequential(sweep, stop=stop)
    if any(s == "preempted" for s in status.values()):
        _say("sweep interrupted; rerun the same command to resume")
        return {"status": status}
    evaluations = {}
    if sweep.eval is not None:
        from rsa_jax.sweep._eval import cached_evaluation

        for v in sweep.variants:
            try:
                evaluations[v.name] = cached_evaluation(sweep.eval, v, evaluate)
            except ConfigError as e:
                raise SweepEvalError(
                    f"{e} (evaluating variant {v.name!r}; every variant trained and is saved: "
                    "fix eval: and rerun, training is skipped)"
                ) from None
    results = collect(sweep, status, evaluations)
    written = write_sweep_results(sweep.run_dir, results)
    _say(f"wrote {', '.join(sorted(os.path.basename(p) for p in written))} to {sweep.run_dir}")
    trackers = [t for t in sweep.variants[0].config.train.report_to if t != "tensorboard"]
    if trackers and jax.process_index() == 0:  # the results table and plot, as artifacts
        from rsa_jax.training import log_artifacts

        log_artifacts(trackers, sweep.run_dir, list(written), folder="sweep")
    return results
