"""vmap mode: K variants trained at once as one program, for small-model sweeps.

Dimension legend: K variants (the leading axis of every stacked parameter, optimizer moment and
hyperparameter), B pairs per step, L tokens.

The step is the trainer's own (`make_train_step`), wrapped in `jax.vmap` over the stacked state
and hyperparameters with the batch shared (`in_axes=None`): every variant sees the same batches
in the same order, exactly as it would alone. Stage references follow the config: `init` is the
one initial model, shared (`in_axes=None`); `previous_stage` is each variant's own policy from
the stage before, stacked (`in_axes=0`). Only traced hyperparameters may differ between
variants; the kernel (loss, risk, version, split_vocab), the model, the data and every shape
must agree.

vmap mode runs on ONE device (the first of `jax.devices()`): the variants' mesh settings are not
used, and the K copies of the parameters and AdamW moments must fit it. It writes each variant's
run directory as the trainer does (`config.json`, `metrics.jsonl`, TensorBoard events, and a
final checkpoint marked done that `rsa-jax export`, `eval` and a sweep rerun read); there are
no checkpoints within a run, so an interrupted vmap sweep starts its unfinished variants afresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rsa_jax.config import Config, MeshConfig, to_json
from rsa_jax.sweep._spec import Sweep, SweepError, Variant
from rsa_jax.training._step import (
    BATCH_KEYS,
    TrainState,
    loss_kwargs,
    make_optimizer,
    make_train_step,
    stage_hyper,
)

# Config keys that may differ between variants of one vmap sweep: the traced hyperparameters
# (they become stacked arguments), and what does not touch the program.
TRACED_STAGE_KEYS = ("beta", "alpha", "mu", "gamma")
TRACED_OPTIM_KEYS = (
    "learning_rate",
    "warmup_ratio",
    "final_lr_ratio",
    "weight_decay",
    "max_grad_norm",
)
KERNEL_KEYS = ("loss", "risk", "version", "split_vocab")
_FREE = ("train.run_dir", "train.progress_bar", "train.peak_tflops", "checkpoint.")


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
        return parts[1] in TRACED_OPTIM_KEYS
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
                f"optim.{{{','.join(TRACED_OPTIM_KEYS)}}}; use mode: sequential"
            )


# jit(vmap(step)) by what shapes the program (the trainer's step cache, plus the reference axis).
_VMAP_CACHE: dict = {}


def vmapped_step(spec, optim, stage, ref_axis, *, microbatches, head, chunk_size):
    """jit(vmap(step)) over (state: 0, reference: ref_axis, batch: None, hyper: 0), the state
    donated; the trainer's un-jitted step, so the maths is the trainer's."""
    static, _ = loss_kwargs(stage)
    key = (
        spec.key,
        tuple(sorted(static.items())),
        (optim.b1, optim.b2, optim.eps),
        ref_axis,
        microbatches,
        head,
        chunk_size,
    )
    fn = _VMAP_CACHE.get(key)
    if fn is None:
        step = make_train_step(
            spec,
            make_optimizer(optim),
            static,
            microbatches=microbatches,
            head=head,
            chunk_size=chunk_size,
        )
        fn = jax.jit(jax.vmap(step, in_axes=(0, ref_axis, None, 0)), donate_argnums=(0,))
        _VMAP_CACHE[key] = fn
    return fn


def clear_vmap_cache() -> None:
    _VMAP_CACHE.clear()


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _meta(config: Config, stage: int, stage_step: int) -> dict:
    rng = jax.random.key_data(jax.random.key(config.train.seed))
    return dict(
        stage=stage,
        stage_step=stage_step,
        done=True,
        rng=np.asarray(rng).tolist(),
        config=json.loads(to_json(config)),
    )


def run_vmap(sweep: Sweep) -> dict[str, str]:
    """Trains every unfinished variant of `sweep` at once; {name: "done" | "skipped"}."""
    from rsa_jax.sweep._run import _say, has_checkpoints, is_done
    from rsa_jax.training._checkpoint import Checkpoints
    from rsa_jax.training._logging import MetricsLog
    from rsa_jax.training._mesh import make_mesh
    from rsa_jax.training._model import build_spec, init_params, llama_config, load_tokenizer
    from rsa_jax.training._trainer import _stage_dataset, batch_pairs

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
    _say(f"vmap: {k} variant(s) in one program on {jax.devices()[0]}")

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    rules = config.mesh.rules
    tokenizer = load_tokenizer(config.model)
    spec = build_spec(config.model, llama_config(config.model, len(tokenizer)), mesh, rules)
    initial = init_params(spec, config.model)
    policy = jax.tree.map(lambda x: jnp.repeat(x[None], k, axis=0), initial)  # [K, ...]

    logs = []
    for v in todo:
        os.makedirs(v.run_dir, exist_ok=True)
        stale = os.path.join(v.run_dir, "metrics.jsonl")
        if os.path.exists(stale):  # from an interrupted vmap run that saved nothing
            os.remove(stale)
        with open(os.path.join(v.run_dir, "config.json"), "w") as f:
            f.write(to_json(v.config))
        logs.append(MetricsLog(v.run_dir, progress=False))
    o = config.optim
    global_step = 0
    t_start = time.perf_counter()
    try:
        for i, stage in enumerate(config.stages):
            iterator, total = _stage_dataset(config, stage, tokenizer)
            hyper = _stack([stage_hyper(v.config.stages[i], v.config.optim, total) for v in todo])
            shared_ref = stage.reference == "init"
            reference = initial if shared_ref else jax.tree.map(jnp.copy, policy)
            tx = make_optimizer(o)
            state = TrainState(policy, jax.vmap(tx.init)(policy), jnp.zeros((k,), jnp.int32))
            step_fn = vmapped_step(
                spec,
                o,
                stage,
                None if shared_ref else 0,
                microbatches=o.microbatches,
                head=config.train.head,
                chunk_size=config.train.chunk_size,
            )
            for log_ in logs:
                log_.start_stage(i, stage.name, total, 0)
            for s in range(1, total + 1):
                batch = next(iterator)
                t0 = time.perf_counter()
                state, metrics = step_fn(
                    state, reference, {key: jnp.asarray(batch[key]) for key in BATCH_KEYS}, hyper
                )
                global_step += 1
                if s % config.train.log_every == 0 or s == total:
                    metrics = jax.device_get(metrics)  # {name: [K]}
                    elapsed = time.perf_counter() - t0
                    for j, log_ in enumerate(logs):
                        one = {name: float(value[j]) for name, value in metrics.items()}
                        tokens = one.pop("tokens")  # the shared batch's real tokens
                        log_.log(i, s, global_step, one, tokens, batch_pairs(batch), elapsed)
            for log_ in logs:
                log_.end_stage()
            policy = state.params
            if i == len(config.stages) - 1:
                keep_ref = stage.reference == "previous_stage"
                for j, v in enumerate(todo):
                    one = jax.tree.map(lambda x, j=j: x[j], state)
                    ckpt = Checkpoints(v.run_dir, keep=v.config.checkpoint.keep, async_save=False)
                    try:
                        ckpt.save(
                            global_step,
                            one,
                            meta=_meta(v.config, i, total),
                            data_iter=iterator,
                            reference=jax.tree.map(lambda x, j=j: x[j], reference)
                            if keep_ref
                            else None,
                        )
                    finally:
                        ckpt.close()
    finally:
        for log_ in logs:
            log_.close()
    _say(f"vmap: {k} variant(s) done in {time.perf_counter() - t_start:.1f} s")
    status.update({v.name: "done" for v in todo})
    return status
