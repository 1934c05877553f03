"""The multi-stage trainer: mesh -> tokenizer/model -> shard -> restore -> stages -> loop.

Each stage builds its data view, optimizer and jitted step; its reference is the initial model or
the frozen policy of the stage before (a device-side copy, never through the host). Checkpoints
carry everything needed to resume mid-stage or between stages; SIGTERM/SIGINT finish the current
step, save and return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from rsa_jax.config import Config, stage_data, to_json, validate
from rsa_jax.data import load_pairs, make_pair_dataset
from rsa_jax.training._checkpoint import Checkpoints, CorruptCheckpoint, abstract_like
from rsa_jax.training._logging import MetricsLog
from rsa_jax.training._mesh import (
    batch_sharding,
    make_mesh,
    maybe_initialize_distributed,
    place_batch,
    replicated,
)
from rsa_jax.training._model import build_spec, init_params, llama_config, load_tokenizer
from rsa_jax.training._step import (
    BATCH_KEYS,
    build_stage_step,
    init_state,
    make_optimizer,
    state_shardings,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    status: str  # "done" or "preempted"
    global_step: int
    params: dict | None  # final policy parameters (flat dict)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves after the current step and returns."""

    def __init__(self):
        self.raised = None

    @contextlib.contextmanager
    def installed(self):
        previous = {}

        def handler(signum, frame):
            self.raised = signal.Signals(signum).name
            log.warning("%s received: finishing the current step, then saving", self.raised)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)


def _device_copy(tree):
    """A fresh on-device buffer per leaf (the donated policy must not alias the reference)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def _stage_dataset(config: Config, stage, tokenizer):
    data = stage_data(config, stage)
    pairs, report = load_pairs(data)
    dataset = make_pair_dataset(
        pairs,
        tokenizer,
        data,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        report=report,
    )
    if len(dataset) == 0:
        raise ValueError(
            f"stage {stage.name!r}: {data.path} gives no full batch ({report.summary()})"
        )
    if stage.steps > len(dataset):
        raise ValueError(
            f"stage {stage.name!r}: steps={stage.steps} but {data.path} gives only "
            f"{len(dataset)} batches of {data.batch_size} pairs over {data.epochs} epoch(s); "
            "lower the stage's steps or raise data.epochs"
        )
    left_out = report.dropped or report.skipped
    (log.warning if left_out else log.info)("stage %r data: %s", stage.name, report.summary())
    total = stage.steps if stage.steps > 0 else len(dataset)
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads)))
    return iterator, total


def train(config: Config) -> RunResult:
    maybe_initialize_distributed()
    mesh = make_mesh(config.mesh)
    validate(config, device_count=mesh.size)
    rules = config.mesh.rules
    rep, batch_sh = replicated(mesh), batch_sharding(mesh, rules)
    run_dir = config.train.run_dir
    os.makedirs(run_dir, exist_ok=True)
    resolved = to_json(config)
    if jax.process_index() == 0:  # one writer when several processes share the run directory
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(resolved)

    tokenizer = load_tokenizer(config.model)
    spec = build_spec(config.model, llama_config(config.model, len(tokenizer)), mesh, rules)
    initial = init_params(spec, config.model)
    reference_init = _device_copy(initial)
    policy = initial
    rng = jax.random.key_data(jax.random.key(config.train.seed))

    ckpt = Checkpoints(
        run_dir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    n_params = sum(int(np.prod(v.shape)) for v in initial.values())
    peak = config.train.peak_tflops * 1e12 * mesh.size
    metrics_log = MetricsLog(
        run_dir,
        progress=config.train.progress_bar,
        flops_per_token=8.0 * n_params / peak if peak else 0.0,
    )
    start_stage, resume, global_step = 0, None, 0
    while True:
        found = ckpt.latest_meta()
        if found is None:
            break
        step_id, meta = found
        if not meta["done"]:
            start_stage, resume, global_step = meta["stage"], step_id, step_id
            break
        # Between stages: the finished stage's policy starts the next one.
        probe = init_state(policy, make_optimizer(config.optim), rep)
        probe = jax.device_put(probe, state_shardings(probe))
        try:
            restored, _ = ckpt.restore(step_id, abstract_like(probe), data_iter=None)
        except CorruptCheckpoint:
            continue
        policy, start_stage, global_step = restored.params, meta["stage"] + 1, step_id
        log.info("resuming after stage %d (checkpoint %d)", meta["stage"], step_id)
        break

    stop = _StopFlag()
    try:
        with stop.installed():
            for i in range(start_stage, len(config.stages)):
                stage = config.stages[i]
                iterator, total = _stage_dataset(config, stage, tokenizer)
                tx = make_optimizer(config.optim)
                reference = reference_init if stage.reference == "init" else _device_copy(policy)
                state = init_state(policy, tx, rep)
                state_sh = state_shardings(state)
                state = jax.device_put(state, state_sh)
                if resume is not None:
                    try:
                        state, restored_ref = ckpt.restore(
                            resume,
                            abstract_like(state),
                            data_iter=iterator,
                            abstract_reference=(
                                abstract_like(reference)
                                if stage.reference == "previous_stage"
                                else None
                            ),
                        )
                    except CorruptCheckpoint:
                        ckpt.close()
                        metrics_log.close()
                        return train(config)  # start over from the previous checkpoint
                    if restored_ref is not None:
                        reference = restored_ref
                    log.info("resumed stage %d at step %d", i, int(state.step))
                    resume = None
                step_fn, hyper = build_stage_step(
                    spec,
                    config.optim,
                    stage,
                    total,
                    state_sh,
                    batch_sh,
                    rep,
                    microbatches=config.optim.microbatches,
                    head=config.train.head,
                    chunk_size=config.train.chunk_size,
                )
                metrics_log.start_stage(i, stage.name, total, int(state.step))

                def save(done: bool, i=i, stage=stage, iterator=iterator, reference=reference):
                    # `state` and `global_step` are read at call time on purpose.
                    meta = dict(
                        stage=i,
                        stage_step=int(state.step),  # noqa: B023
                        done=done,
                        rng=np.asarray(rng).tolist(),
                        config=json.loads(resolved),
                    )
                    ckpt.save(
                        global_step,  # noqa: B023
                        state,  # noqa: B023
                        meta=meta,
                        data_iter=iterator,
                        reference=reference if stage.reference == "previous_stage" else None,
                    )

                last_saved = None
                while int(state.step) < total:
                    batch = next(iterator)
                    t0 = time.perf_counter()
                    state, metrics = step_fn(
                        state,
                        reference,
                        place_batch({k: batch[k] for k in BATCH_KEYS}, batch_sh),
                        hyper,
                    )
                    global_step += 1
                    stage_step = int(state.step)
                    if stage_step % config.train.log_every == 0 or stage_step == total:
                        metrics = {k: float(v) for k, v in metrics.items()}
                        elapsed = time.perf_counter() - t0
                        tokens = metrics.pop("tokens")  # global, all hosts
                        pairs = config.data.batch_size  # global
                        metrics_log.log(i, stage_step, global_step, metrics, tokens, pairs, elapsed)
                    every = config.checkpoint.every
                    if every and stage_step % every == 0 and stage_step < total:
                        save(done=False)
                        last_saved = global_step
                    if stop.raised and stage_step < total:
                        if last_saved != global_step:
                            save(done=False)
                        ckpt.wait()
                        log.warning("stopped by %s at stage %d step %d", stop.raised, i, stage_step)
                        return RunResult("preempted", global_step, None)
                save(done=True)
                metrics_log.end_stage()
                policy = state.params
                if stop.raised:
                    ckpt.wait()
                    return RunResult("preempted", global_step, None)
    finally:
        ckpt.close()
        metrics_log.close()
    return RunResult("done", global_step, policy)


def batch_pairs(batch) -> int:
    return batch["input_ids"].shape[0] // 2


def latest_policy(run_dir: str, config: Config | None = None):
    """(spec, flat policy params, tokenizer) of the newest usable checkpoint of a run."""
    from rsa_jax.config import from_json

    if config is None:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = from_json(f.read())
    mesh = make_mesh(dataclasses.replace(config.mesh, data=-1, fsdp=1, tensor=1))
    tokenizer = load_tokenizer(config.model)
    spec = build_spec(
        config.model, llama_config(config.model, len(tokenizer)), mesh, config.mesh.rules
    )
    ckpt = Checkpoints(run_dir, keep=config.checkpoint.keep, async_save=False)
    try:
        while True:
            found = ckpt.latest_meta()
            if found is None:
                raise FileNotFoundError(f"{run_dir}: no usable checkpoint")
            abstract_params = spec.abstract_params()
            tx = make_optimizer(config.optim)
            opt = jax.eval_shape(tx.init, abstract_params)
            rep = replicated(mesh)
            opt = jax.tree.map(
                lambda s, rep=rep: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), opt
            )
            from rsa_jax.training._step import TrainState

            abstract = TrainState(
                abstract_params, opt, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
            )
            try:
                state, _ = ckpt.restore(found[0], abstract, data_iter=None)
            except CorruptCheckpoint:
                continue
            return spec, state.params, tokenizer
    finally:
        ckpt.close()
