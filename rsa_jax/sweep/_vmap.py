"""vmap mode: K variants trained at once as one program, for small-model sweeps.

Dimension legend: K variants (the leading axis of every stacked parameter, optimizer moment and
hyperparameter), B pairs per step, L tokens.

The step is the engine's own (`Engine.vmapped_step`): `jax.vmap` over the stacked state
and hyperparameters with the batch shared (`in_axes=None`): every variant sees the same batches
in the same order, exactly as it would alone. Stage references follow the config: `init` is the
one initial model, shared (`in_axes=None`); `previous_stage` is each variant's own policy from
the stage before, stacked (`in_axes=0`). Only traced hyperparameters may differ between
variants; the kernel (loss, risk, version, split_vocab), the model, the data and every shape
must agree.

Shared stages (`shared_stages`): the leading stages on which every variant agrees (the same
stage config, the same `optim`, hence the same data, start and program) are trained ONCE,
un-vmapped, with the engine's own compiled step (the trainer's program), and their metrics are
logged in every variant's run; the vmap starts at the first stage where the variants differ,
from K copies of the shared policy. If that stage's reference is `previous_stage`, it is the
shared policy passed once (`in_axes=None`), not K stacked copies. A two-stage sweep over the
stage-2 beta thus costs one stage 1 plus one vmapped stage 2 (what `rsa-jax demo` runs).

By default vmap mode runs on ONE device (the first of `jax.devices()`): the variants' mesh
settings are not used, and the K copies of the parameters and AdamW moments must fit it. With
the sweep file's `variant_devices: V` the K axis is split over a `variant` mesh axis of V
devices and each group of the remaining devices is laid out by the config's mesh, as a training
run would be (`rsa_jax.sweep._placement`: what is stacked, what is shared). It writes each variant's
run directory as the trainer does (`config.json`, `metrics.jsonl`, TensorBoard events, and a
final checkpoint marked done that `rsa-jax export`, `eval` and a sweep rerun read, and, like the
trainer, the policy each non-final stage ended with in `stages/<i>`, so `RUN@0` sources work for
RSA(P) merges, and every `checkpoint.candidates_every` steps the policy in `candidates/`);
there are no resumable checkpoints within a run, so an interrupted vmap sweep starts its
unfinished variants afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from functools import partial

import jax
import jax.numpy as jnp

from rsa_jax.config import COSMETIC, LABEL, TRACED, StageConfig, key_kind, to_json, traced_fields
from rsa_jax.losses import Kernel
from rsa_jax.sweep._file import Sweep, SweepError, Variant
from rsa_jax.sweep._placement import VARIANT_AXIS, VariantPlacement, variant_placement
from rsa_jax.sweep._status import has_checkpoints, is_done
from rsa_jax.sweep._status import say as _say
from rsa_jax.training import (
    TRACED_OPTIM_FIELDS,
    Engine,
    Hooks,
    Hyper,
    Run,
    RunDir,
    Stage,
    StepInfo,
    StopSignal,
    TrainState,
    absolute_paths,
    device_copy,
    save_candidate,
    save_stage_policy,
    stage_dropout_key,
    steps_done,
)

# Config keys that may differ between variants of one vmap sweep, from the kinds declared next
# to each field in `rsa_jax.config`: the traced hyperparameters (they become stacked arguments;
# train.seed among them: it only seeds LoRA adapter dropout, whose key is a stacked input), and
# what does not touch the program (COSMETIC: run_dir, logging, checkpoints; LABEL: stage names).
TRACED_STAGE_KEYS = traced_fields(StageConfig)
KERNEL_KEYS = tuple(f.name for f in dataclasses.fields(Kernel))
_FREE_KINDS = (TRACED, COSMETIC, LABEL)


def _flat(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def _may_differ(key: str) -> bool:
    return key_kind(key) in _FREE_KINDS


def check_vmappable(variants: list[Variant]) -> None:
    """Raises SweepError naming the first variant and key that differs from the first variant
    in anything but the traced hyperparameters."""
    first = variants[0]
    if first.config.train.eval_every:
        raise SweepError(
            "vmap mode: train.eval_every (held-out evaluation during training) runs in "
            "sequential sweeps only; use mode: sequential, or evaluate after training (eval:)"
        )
    base = _flat(dataclasses.asdict(first.config))
    for v in variants[1:]:
        flat = _flat(dataclasses.asdict(v.config))
        for key in sorted(set(base) | set(flat)):
            a, b = base.get(key, "<absent>"), flat.get(key, "<absent>")
            if a == b or _may_differ(key):
                continue
            what = (
                "a different kernel, so a different program"
                if key.split(".")[-1] in KERNEL_KEYS
                else "not a traced hyperparameter"
            )
            raise SweepError(
                f"vmap mode: variant {v.name!r} differs from {first.name!r} in {key} "
                f"({b!r} vs {a!r}): {what}. In vmap mode variants may differ only in "
                f"stages.N.{{{','.join(TRACED_STAGE_KEYS)}}} and "
                f"optim.{{{','.join(TRACED_OPTIM_FIELDS)}}}; use mode: sequential"
            )


def shared_stages(variants: list[Variant]) -> int:
    """How many leading stages all `variants` train identically, so the vmap may start after
    them: stage i is shared when every variant has the same `stages[i]` config (kernel,
    hyperparameters, data view, reference, steps) and all earlier stages are shared, and the
    variants have the same `optim` (it applies to every stage) and `train.seed` (it seeds LoRA
    adapter dropout, the one thing `check_vmappable` lets differ besides hyperparameters). The
    last stage is never counted, so each variant still gets its own final state (identical
    variants train it K times). Everything else (model, data) must already agree
    (`check_vmappable`)."""
    first = variants[0].config
    if any(
        v.config.optim != first.optim or v.config.train.seed != first.train.seed
        for v in variants[1:]
    ):
        return 0
    shared = 0
    for i, stage in enumerate(first.stages[:-1]):
        if any(v.config.stages[i] != stage for v in variants[1:]):
            break
        shared = i + 1
    return shared


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def run_vmap(sweep: Sweep, stop: StopSignal | None = None) -> dict[str, str]:
    """Trains every unfinished variant of `sweep` at once; {name: "done" | "skipped" |
    "preempted"}. A signal seen by `stop` ends the training after the current step: the
    unfinished variants are "preempted" (a rerun trains them afresh).

    Every variant's run directory is locked first (RunDirError naming the holder when another
    sweep or trainer uses one), so two vmap sweeps never write one run directory."""
    stop = StopSignal() if stop is None else stop
    with contextlib.ExitStack() as locks:
        for v in sweep.variants:
            locks.enter_context(RunDir(v.run_dir).lock())
        return _run_vmap_locked(sweep, stop)


def _run_vmap_locked(sweep: Sweep, stop: StopSignal) -> dict[str, str]:
    status = {v.name: "skipped" for v in sweep.variants if is_done(v)}
    todo = [v for v in sweep.variants if v.name not in status]
    for name in status:
        _say(f"  {name}: finished earlier, skipped")
    if not todo:
        return status
    check_vmappable(todo)
    for v in todo:
        if has_checkpoints(v.run_dir):
            raise SweepError(
                f"variant {v.name!r}: {v.run_dir} holds an unfinished run; vmap mode starts "
                "variants afresh: finish it with --mode sequential or remove the directory"
            )
    group = _program_group(sweep, todo)
    config = group[0].config
    k = len(group)
    placement = variant_placement(config, k, sweep.variant_devices, where=sweep.path)
    _say(f"vmap: {placement.describe()}")

    engine = Engine(config, layout=placement.layout, check_devices=False)
    initial = engine.initial

    # One Run per unfinished variant; a finished one retrained in the group has none (nothing
    # of it is logged or written again).
    runs: list[Run | None] = []
    try:
        for v in group:
            runs.append(_start_variant(v) if v in todo else None)
        t_start = time.perf_counter()
        # The trainer's hooks, per variant, each fed its variant's slice of the step's metrics.
        on_step = Hooks()

        def keep_candidate(j: int, info: StepInfo) -> None:  # checkpoint.candidates_every
            params = info.stage.state.params  # [K, ...] once the stages differ
            if info.stage.index >= first_vmapped:
                params = placement.slice(params, j)
            save_candidate(group[j].run_dir, info.stage.index, info.step, params)

        for j, run in enumerate(runs):
            if run is not None:  # no save: vmap mode keeps no checkpoint within a run
                hooks = run.hooks(
                    report_compile=not on_step.hooks,
                    stop=stop,
                    candidate=partial(keep_candidate, j),
                )
                on_step.add(partial(_variant_hooks, hooks, j))
        writing = [run for run in runs if run is not None]
        first_vmapped = shared_stages(group)
        policy = initial
        for i in range(first_vmapped):  # trained once for all K variants
            _say(
                f"vmap: stage {i} ({config.stages[i].name}) is the same in all {k} variant(s): "
                "trained once"
            )
            stage = engine.stage(i, policy)
            if not _fit_logged(engine, stage, on_step, writing):
                return _stopped(status, todo, stop, stage)
            policy = stage.state.params
            for v in todo:
                save_stage_policy(v.run_dir, i, policy)
        shared_policy = policy  # [...]: the stage-`first_vmapped` reference, if it follows
        policy = placement.stack(policy)  # [K, ...], K over the variant axis
        for i in range(first_vmapped, len(config.stages)):
            stage_config = config.stages[i]
            batches, total = engine.stage_batches(i)
            hyper = placement.hyper(
                _stack(
                    [
                        Hyper.for_stage(
                            v.config.stages[i],
                            v.config.optim,
                            total,
                            stage_dropout_key(v.config, i),
                        )
                        for v in group
                    ]
                )
            )
            # One reference for all K (in_axes=None): the initial model, or the shared policy
            # of the stage before when every variant ended that stage alike; else K stacked.
            if not stage_config.follows_previous:
                ref_axis, ref = None, None
            elif i == first_vmapped and first_vmapped > 0:
                ref_axis, ref = None, shared_policy  # never donated: the state holds copies
            else:
                ref_axis, ref = 0, device_copy(policy)
            if engine.model.lora is None:
                reference = initial if ref is None else ref
            else:  # one frozen base for all K (not vmapped); adapters off, shared or stacked
                reference = engine.frozen(ref)
            state = TrainState(policy, placement.opt_state(engine, policy), placement.steps())
            step_fn = engine.vmapped_step(
                engine.objective(stage_config),
                ref_axis,
                shardings=placement.step_shardings(engine, state, reference),
                axis_name=VARIANT_AXIS,
            )  # each variant's state on its group's devices; cached by the shardings: 1 compile
            stage = Stage(i, stage_config, state, reference, batches, total, step_fn, hyper)
            # the engine's batch placement: shared
            if not _fit_logged(engine, stage, on_step, writing):
                return _stopped(status, todo, stop, stage)
            policy = stage.state.params
            if i == len(config.stages) - 1:
                _save_finals(runs, placement, stage, engine.saved_reference(stage), ref_axis)
            else:
                for j, v in enumerate(group):
                    if v in todo:
                        save_stage_policy(v.run_dir, i, placement.slice(policy, j))
    finally:
        for run in runs:
            if run is not None:
                run.close()
    _say(f"vmap: {k} variant(s) done in {time.perf_counter() - t_start:.1f} s")
    status.update({v.name: "done" for v in todo})
    return status


def _program_group(sweep: Sweep, todo: list[Variant]) -> list[Variant]:
    """The variants to train as one program: the unfinished ones, or, when some variants of
    the sweep finished earlier (a sweep interrupted while it saved its final checkpoints), all
    of them again, so an unfinished variant comes out of the same K-variant program as in an
    uninterrupted sweep (a K=1 program sums in another order, and the CVaR tail turns that
    rounding into visible differences). The finished ones are retrained, not rewritten."""
    if len(todo) == len(sweep.variants):
        return todo
    group = list(sweep.variants)
    try:
        check_vmappable(group)
    except SweepError:  # finished under other settings (another kernel): train the rest alone
        return todo
    _say(
        f"vmap: {len(todo)} unfinished variant(s) trained in one program with the "
        f"{len(group) - len(todo)} finished one(s), as the interrupted sweep did (those are "
        "not rewritten)"
    )
    return group


def _start_variant(v: Variant) -> Run:
    """The variant's run writers, its metrics log started afresh (config.json comes with its
    final checkpoint, as in the trainer)."""
    os.makedirs(v.run_dir, exist_ok=True)
    stale = RunDir(v.run_dir).metrics_file
    if os.path.exists(stale):  # from an interrupted vmap run that saved nothing
        os.remove(stale)
    return Run(
        v.config,
        v.run_dir,
        resolved=to_json(absolute_paths(v.config)),
        label=v.name,
        progress=False,
        async_save=False,
    )


def _variant_hooks(hooks: Hooks, j: int, info: StepInfo) -> bool:
    return hooks.run(info.variant(j))


def _fit_logged(engine: Engine, stage: Stage, on_step, runs: list[Run]) -> bool:
    """Fits `stage` with every variant's log; False when a stop signal ended it early."""
    for run in runs:
        run.metrics.start_stage(stage.index, stage.config.name, stage.total, 0)
    finished = engine.fit(stage, on_step)
    for run in runs:
        run.metrics.end_stage()
    return finished


def _stopped(status: dict[str, str], todo: list[Variant], stop, stage: Stage) -> dict[str, str]:
    _say(
        f"vmap: stopped by {stop.raised} at stage {stage.index} step {steps_done(stage.state)}; "
        f"vmap mode keeps no checkpoint within a run, so a rerun trains the {len(todo)} "
        "unfinished variant(s) afresh"
    )
    status.update({v.name: "preempted" for v in todo})
    return status


def _save_finals(
    runs: list[Run | None],
    placement: VariantPlacement,
    stage: Stage,
    reference,
    ref_axis: int | None,
) -> None:
    """Each variant's slice of the stacked final state (and of the trained `reference`, if
    any: stacked, or with `ref_axis` None one reference shared by all), gathered from its
    variant group, as its run's final checkpoint."""
    for j, run in enumerate(runs):
        if run is None:  # finished earlier: its checkpoint stays as it was
            continue
        run.save(
            stage.index,
            placement.slice(stage.state, j),
            stage_step=stage.total,
            done=True,
            data_iter=stage.batches,
            reference=None
            if reference is None
            else reference
            if ref_axis is None
            else placement.slice(reference, j),
        )
