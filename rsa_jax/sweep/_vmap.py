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

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rsa_jax.config import Config, to_json
from rsa_jax.losses import TRACED_NAMES, Kernel
from rsa_jax.sweep._file import Sweep, SweepError, Variant
from rsa_jax.sweep._placement import VARIANT_AXIS, VariantPlacement, variant_placement
from rsa_jax.training import (
    TRACED_OPTIM_FIELDS,
    Checkpoints,
    Engine,
    Hyper,
    MetricsLog,
    Stage,
    TrainState,
    absolute_paths,
    candidate_due,
    device_copy,
    save_candidate,
    save_stage_policy,
    stage_dropout_key,
    steps_done,
    write_config,
)

# Config keys that may differ between variants of one vmap sweep: the traced hyperparameters
# (they become stacked arguments), and what does not touch the program.
TRACED_STAGE_KEYS = TRACED_NAMES
KERNEL_KEYS = tuple(f.name for f in dataclasses.fields(Kernel))
# train.seed only seeds LoRA adapter dropout, whose key is a traced (stacked) input: variants
# with other seeds draw other masks in the same program.
_FREE = ("train.run_dir", "train.progress_bar", "train.peak_tflops", "train.seed", "checkpoint.")


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
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) == 3:
        return parts[2] in TRACED_STAGE_KEYS or parts[2] == "name"
    if parts[0] == "optim" and len(parts) == 2:
        return parts[1] in TRACED_OPTIM_FIELDS
    return key in _FREE or any(key.startswith(p) for p in _FREE if p.endswith("."))


def check_vmappable(variants: list[Variant]) -> None:
    """Raises SweepError naming the first variant and key that differs from the first variant
    in anything but the traced hyperparameters."""
    first = variants[0]
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


def _meta(config: Config, stage: int, stage_step: int) -> dict:
    rng = jax.random.key_data(jax.random.key(config.train.seed))
    return dict(
        stage=stage,
        stage_step=stage_step,
        done=True,
        rng=np.asarray(rng).tolist(),
        config=json.loads(to_json(absolute_paths(config))),
    )


def run_vmap(sweep: Sweep) -> dict[str, str]:
    """Trains every unfinished variant of `sweep` at once; {name: "done" | "skipped"}."""
    from rsa_jax.sweep._run import _say, has_checkpoints, is_done

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
    config = todo[0].config
    k = len(todo)
    placement = variant_placement(config, k, sweep.variant_devices, where=sweep.path)
    _say(f"vmap: {placement.describe()}")

    engine = Engine(config, layout=placement.layout, check_devices=False)
    initial = engine.initial

    logs = []
    for v in todo:
        os.makedirs(v.run_dir, exist_ok=True)
        stale = os.path.join(v.run_dir, "metrics.jsonl")
        if os.path.exists(stale):  # from an interrupted vmap run that saved nothing
            os.remove(stale)
        write_config(v.run_dir, to_json(absolute_paths(v.config)))
        logs.append(MetricsLog(v.run_dir, progress=False, label=v.name))
    global_step = 0
    t_start = time.perf_counter()

    def on_step(stage: Stage, metrics, seconds, compile_seconds) -> bool:
        nonlocal global_step
        global_step += 1
        s = steps_done(stage.state)
        if s % config.train.log_every == 0 or s == stage.total:
            metrics = jax.device_get(metrics)  # {name: [K]}, or scalars in a shared stage
            for j, log_ in enumerate(logs):
                one = {name: _variant_value(value, j) for name, value in metrics.items()}
                tokens = one.pop("tokens")  # the shared batch's real tokens
                pairs = config.data.batch_size
                log_.log(stage.index, s, global_step, one, tokens, pairs, seconds)
        if candidate_due(config, s, stage.total):  # the same cadence in every variant
            stacked = stage.index >= first_vmapped
            for j, v in enumerate(todo):
                params = placement.slice(stage.state.params, j) if stacked else stage.state.params
                save_candidate(v.run_dir, stage.index, s, params)
        return False

    first_vmapped = shared_stages(todo)
    try:
        policy = initial
        for i in range(first_vmapped):  # trained once for all K variants
            _say(
                f"vmap: stage {i} ({config.stages[i].name}) is the same in all {k} variant(s): "
                "trained once"
            )
            stage = engine.stage(i, policy)
            _fit_logged(engine, stage, on_step, logs)
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
                        for v in todo
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
            _fit_logged(engine, stage, on_step, logs)  # the engine's batch placement: shared
            policy = stage.state.params
            if i == len(config.stages) - 1:
                _save_finals(
                    todo, placement, stage, engine.saved_reference(stage), global_step, ref_axis
                )
            else:
                for j, v in enumerate(todo):
                    save_stage_policy(v.run_dir, i, placement.slice(policy, j))
    finally:
        for log_ in logs:
            log_.close()
    _say(f"vmap: {k} variant(s) done in {time.perf_counter() - t_start:.1f} s")
    status.update({v.name: "done" for v in todo})
    return status


def _variant_value(value, j: int) -> float:
    """Variant j's metric: [K] in a vmapped stage, one scalar for all in a shared stage."""
    value = np.asarray(value)
    return float(value if value.ndim == 0 else value[j])


def _fit_logged(engine: Engine, stage: Stage, on_step, logs, place=None) -> None:
    for log_ in logs:
        log_.start_stage(stage.index, stage.config.name, stage.total, 0)
    engine.fit(stage, on_step, place=place)
    for log_ in logs:
        log_.end_stage()


def _save_finals(
    variants: list[Variant],
    placement: VariantPlacement,
    stage: Stage,
    reference,
    global_step: int,
    ref_axis: int | None,
) -> None:
    """Each variant's slice of the stacked final state (and of the trained `reference`, if
    any: stacked, or with `ref_axis` None one reference shared by all), gathered from its
    variant group, as its run's final checkpoint."""
    keep_ref = reference is not None
    for j, v in enumerate(variants):
        one = placement.slice(stage.state, j)
        ckpt = Checkpoints(v.run_dir, keep=v.config.checkpoint.keep, async_save=False)
        try:
            ckpt.save(
                global_step,
                one,
                meta=_meta(v.config, stage.index, stage.total),
                data_iter=stage.batches,
                reference=None
                if not keep_ref
                else reference
                if ref_axis is None
                else placement.slice(reference, j),
            )
        finally:
            ckpt.close()
