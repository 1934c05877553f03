"""`train(config)`: the stages of a config on the engine, with checkpoints, metrics and signals.

    engine -> where to start (newest usable checkpoint) -> for each stage: prepare, fit, save

Checkpoints carry everything needed to resume mid-stage or between stages (policy, optimizer
state, the reference when it is a trained stage, the data iterator position, the stage index);
a checkpoint that fails to restore is set aside and the one before it is used. SIGTERM/SIGINT
finish the current step, save and return "preempted".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rsa_jax.config import Config, from_json, to_json
from rsa_jax.training._checkpoint import Checkpoints, CorruptCheckpoint, abstract_like
from rsa_jax.training._control import StopSignal, check_finite
from rsa_jax.training._engine import Engine, Stage, steps_done
from rsa_jax.training._logging import MetricsLog
from rsa_jax.training._mesh import Layout, make_mesh
from rsa_jax.training._rundir import absolute_paths, check_resume, lock_run_dir, write_config

log = logging.getLogger(__name__)

CANDIDATES = "candidates"  # run_dir/candidates/<stage>_<step>/: checkpoint.candidates_every
_CANDIDATE = re.compile(r"^(\d+)_(\d+)$")


@dataclasses.dataclass
class RunResult:
    status: str  # "done" or "preempted"
    global_step: int
    params: dict | None  # final policy parameters (flat dict); None when preempted


class _RunDir:
    """The run directory's writers: checkpoints and the metrics log, and the global step."""

    def __init__(self, engine: Engine, resolved: str, label: str | None = None):
        config = engine.config
        self.engine, self.resolved = engine, resolved
        self.ckpt = Checkpoints(
            config.train.run_dir,
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
        )
        model = engine.model.full or engine.model  # FLOPs: every weight, frozen ones too
        n_params = sum(int(np.prod(v.shape)) for v in model.abstract_params().values())
        peak = config.train.peak_tflops * 1e12 * engine.layout.mesh.size
        self.metrics = MetricsLog(
            config.train.run_dir,
            progress=config.train.progress_bar,
            flops_per_token=8.0 * n_params / peak if peak else 0.0,
            label=label,
        )
        self.global_step = 0
        self.rng = np.asarray(jax.random.key_data(jax.random.key(config.train.seed))).tolist()

    def close(self) -> None:
        self.ckpt.close()
        self.metrics.close()

    def save(self, stage: Stage, *, done: bool) -> None:
        meta = dict(
            stage=stage.index,
            stage_step=steps_done(stage.state),
            done=done,
            rng=self.rng,
            config=json.loads(self.resolved),
        )
        self.ckpt.save(
            self.global_step,
            stage.state,
            meta=meta,
            data_iter=stage.batches,
            reference=self.engine.saved_reference(stage),
        )

    def starting_point(self) -> tuple[int, dict | None, Stage | None]:
        """(first stage to run, its starting policy, or a mid-stage Stage restored from the
        newest usable checkpoint). A checkpoint that fails to restore is set aside by
        `Checkpoints` and the one before it is tried."""
        engine = self.engine
        while (found := self.ckpt.latest_meta()) is not None:
            step_id, meta = found
            try:
                if meta["done"]:  # between stages: the finished policy starts the next stage
                    state, _ = self.ckpt.restore(step_id, engine.abstract_state(), data_iter=None)
                    run_dir, finished = engine.config.train.run_dir, meta["stage"]
                    last = finished == len(engine.config.stages) - 1
                    if not last and not os.path.isdir(stage_policy_dir(run_dir, finished)):
                        # killed between the stage's last checkpoint and its policy copy
                        save_stage_policy(run_dir, finished, state.params)
                    self.global_step = step_id
                    log.info("resuming after stage %d (checkpoint %d)", meta["stage"], step_id)
                    return meta["stage"] + 1, state.params, None
                stage = engine.stage(meta["stage"], engine.initial)
                saved_reference = engine.saved_reference(stage)
                stage.state, reference = self.ckpt.restore(
                    step_id,
                    abstract_like(stage.state),
                    data_iter=stage.batches,
                    abstract_reference=(
                        abstract_like(saved_reference) if saved_reference is not None else None
                    ),
                )
            except CorruptCheckpoint:
                continue
            engine.restore_reference(stage, reference)
            self.global_step = step_id
            log.info("resumed stage %d at step %d", stage.index, steps_done(stage.state))
            return stage.index, None, stage
        return 0, engine.initial, None

    def run_stage(self, stage: Stage, stop: StopSignal) -> bool:
        """Fits the stage with logging, periodic checkpoints and the stop flag; saves the
        stage's final checkpoint. False when stopped by a signal before the stage's end."""
        config = self.engine.config
        last_saved = None

        def on_step(stage: Stage, metrics, seconds, compile_seconds) -> bool:
            nonlocal last_saved
            self.global_step += 1
            step = steps_done(stage.state)
            # A NaN/inf loss or gradient norm stops the run before anything is saved.
            check_finite(
                {k: float(metrics[k]) for k in ("loss", "grad_norm")},
                stage=stage.config.name,
                step=step,
                last_checkpoint=last_saved,
            )
            if compile_seconds > 0:
                log.info("stage %d step %d compiled in %.1f s", stage.index, step, compile_seconds)
            if step % config.train.log_every == 0 or step == stage.total:
                metrics = {k: float(v) for k, v in metrics.items()}
                if compile_seconds > 0:  # kept out of the step time and throughput
                    metrics["compile_s"] = compile_seconds
                tokens = metrics.pop("tokens")  # global, all hosts
                pairs = config.data.batch_size  # global
                self.metrics.log(
                    stage.index, step, self.global_step, metrics, tokens, pairs, seconds
                )
            if candidate_due(config, step, stage.total):
                save_candidate(config.train.run_dir, stage.index, step, stage.state.params)
            every = config.checkpoint.every
            if every and step % every == 0 and step < stage.total:
                self.save(stage, done=False)
                last_saved = self.global_step
            if stop.raised and step < stage.total:
                if last_saved != self.global_step:
                    self.save(stage, done=False)
                return True
            return False

        self.metrics.start_stage(
            stage.index, stage.config.name, stage.total, steps_done(stage.state)
        )
        if not self.engine.fit(stage, on_step):
            self.ckpt.wait()
            log.warning(
                "stopped by %s at stage %d step %d",
                stop.raised,
                stage.index,
                steps_done(stage.state),
            )
            return False
        self.save(stage, done=True)
        if stage.index < len(config.stages) - 1:
            save_stage_policy(config.train.run_dir, stage.index, stage.state.params)
        self.metrics.end_stage()
        return True


def train(
    config: Config,
    *,
    tx: optax.GradientTransformation | None = None,
    layout: Layout | None = None,
    stop: StopSignal | None = None,
    label: str | None = None,
) -> RunResult:
    """Runs (or resumes) every stage of `config` in its run directory.

    `tx`: an optax transformation to use instead of the built-in AdamW (whose learning rate,
    schedule, decay and clipping come from `config.optim` as traced values). `layout`: the mesh
    and rules (default: `config.mesh` over all devices). `stop`: the stop-signal handler (the CLI
    passes one that saw signals during its imports); SIGTERM/SIGINT from start-up on end the run
    cleanly with status "preempted", unless they arrive during the last step (then "done").

    The run directory is locked for the run (a second trainer fails at once), and resumes only
    with a matching config (`train.resume=force` resumes anyway; see `check_resume`). `label`
    (a sweep variant's name) prefixes the printed summaries and the progress bar.
    """
    stop = StopSignal() if stop is None else stop
    with stop.installed():  # first: a signal during start-up is a clean stop too
        engine = Engine(absolute_paths(config), layout=layout, tx=tx)
        with lock_run_dir(engine.config.train.run_dir):
            return _train_locked(engine, stop, label)


def _train_locked(engine: Engine, stop: StopSignal, label: str | None) -> RunResult:
    config = engine.config
    run_dir = config.train.run_dir
    resolved = to_json(config)
    differ = check_resume(run_dir, json.loads(resolved), force=config.train.resume == "force")
    if differ:
        log.warning("resuming %s with other values of %s (train.resume=force)", run_dir, differ)
    if jax.process_count() > 1:  # every process compared the same file before it is rewritten
        multihost_utils.sync_global_devices("rsa_jax config checked")
    if jax.process_index() == 0:  # one writer when several processes share the run directory
        write_config(run_dir, resolved)
    run = _RunDir(engine, resolved, label)
    try:
        first, policy, stage = run.starting_point()
        engine.check_stage_data(first)  # every later stage's data, before anything trains
        if stop.should_stop():
            log.warning("stopped by %s during start-up", stop.raised)
            return RunResult("preempted", run.global_step, None)
        for i in range(first, len(config.stages)):
            if stage is None:
                assert policy is not None  # starting_point gives a policy or a stage
                stage = engine.stage(i, policy)
            if not run.run_stage(stage, stop):
                return RunResult("preempted", run.global_step, None)
            policy, stage = stage.state.params, None
            if stop.raised and i < len(config.stages) - 1:  # during the last step: done
                run.ckpt.wait()
                return RunResult("preempted", run.global_step, None)
    finally:
        run.close()
    return RunResult("done", run.global_step, policy)


def stage_policy_dir(run_dir: str, index: int) -> str:
    """Where the policy a (non-final) stage ended with is kept: checkpoint retention never
    deletes it, so RSA(P) can merge the stage-1 and final policies of one run."""
    return os.path.join(os.path.abspath(run_dir), "stages", str(index))


def save_stage_policy(run_dir: str, index: int, params: dict) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(stage_policy_dir(run_dir, index), params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def candidate_dir(run_dir: str, index: int, step: int) -> str:
    """Where the policy at `step` of stage `index` is kept as a frontier candidate
    (`checkpoint.candidates_every`): retention never deletes it, like `stage_policy_dir`."""
    return os.path.join(os.path.abspath(run_dir), CANDIDATES, f"{index}_{step}")


def candidate_due(config: Config, step: int, total: int) -> bool:
    """Whether the policy after `step` of a stage of `total` steps is kept as a candidate: every
    `checkpoint.candidates_every` steps, not at the stage's end (its own policy is kept then)."""
    every = config.checkpoint.candidates_every
    return bool(every) and step % every == 0 and step < total


def save_candidate(run_dir: str, index: int, step: int, params: dict) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(candidate_dir(run_dir, index, step), params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def list_candidates(run_dir: str) -> list[tuple[int, int]]:
    """[(stage index, step)] of the run's finished candidates, in training order (an interrupted
    write leaves Orbax's temporary name, which is not listed)."""
    root = os.path.join(os.path.abspath(run_dir), CANDIDATES)
    if not os.path.isdir(root):
        return []
    found = [m.groups() for name in os.listdir(root) if (m := _CANDIDATE.match(name))]
    return sorted((int(i), int(s)) for i, s in found)


def split_candidate(stage: str | int) -> tuple[str, int | None]:
    """`"1:40"` -> ("1", 40) (stage 1's candidate at step 40); anything else -> (stage, None)."""
    name, sep, step = str(stage).partition(":")
    if not sep:
        return str(stage), None
    if not step.isdigit():
        raise ValueError(f"stage {stage!r}: a candidate is STAGE:STEP with STEP a step number")
    return name, int(step)


def stage_index(config: Config, stage: str | int) -> int:
    """A stage by index or by name; ValueError naming the stages otherwise."""
    names = [s.name for s in config.stages]
    if isinstance(stage, int) or str(stage).lstrip("-").isdigit():
        i = int(stage)
        if not 0 <= i < len(names):
            raise ValueError(f"stage {i}: the run has stages 0..{len(names) - 1} ({names})")
        return i
    if stage not in names:
        raise ValueError(f"stage {stage!r}: the run's stages are {names}")
    return names.index(stage)


def load_policy(
    run_dir: str,
    config: Config | None = None,
    *,
    stage: str | int | None = None,
    layout: Layout | None = None,
):
    """(engine, flat policy params) of the newest usable checkpoint of a run directory, or,
    with `stage` (index or name), the policy that stage ended with, or with `STAGE:STEP` the
    candidate kept at that step (`checkpoint.candidates_every`). For a LoRA run these are
    the merged parameters (the base dequantized plus (alpha / r) A B, float32), which
    `engine.model.module(params)` builds; `load_adapters` gives the adapters themselves.

    The engine holds the model definition (`engine.model.module(params)` is the NNX model) and
    the tokenizer. The run's own mesh settings are replaced by data parallelism over every
    device, so a run trained on a pod slice loads on one machine; `layout` restores onto another
    mesh instead (evaluation on the training mesh).
    """
    engine, params = load_adapters(run_dir, config, stage=stage, layout=layout)
    return engine, engine.merged(params)


def load_adapters(
    run_dir: str,
    config: Config | None = None,
    *,
    stage: str | int | None = None,
    layout: Layout | None = None,
):
    """(engine, the trained parameters as checkpointed): `load_policy` without the merge, so
    for a LoRA run the adapters (`engine.base` is the frozen base, `engine.model.lora` the
    spec: what `save_merged_hf` and `save_peft` take)."""
    if config is None:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = from_json(f.read())
    if layout is None:
        mesh = make_mesh(dataclasses.replace(config.mesh, data=-1, fsdp=1, tensor=1))
        layout = Layout(mesh, config.mesh.rules)
    engine = Engine(config, layout=layout, check_devices=False)
    if stage is not None and (step := split_candidate(stage)[1]) is not None:
        index = stage_index(config, split_candidate(stage)[0])
        path = candidate_dir(run_dir, index, step)
        if not os.path.isdir(path):
            kept = [f"{i}:{s}" for i, s in list_candidates(run_dir)]
            raise FileNotFoundError(
                f"{run_dir}: no candidate at stage {index} step {step} ({path}); kept: "
                f"{kept or 'none (checkpoint.candidates_every was 0)'}"
            )
        checkpointer = ocp.StandardCheckpointer()
        try:
            return engine, checkpointer.restore(path, engine.model.abstract_params())
        finally:
            checkpointer.close()
    if stage is not None and (index := stage_index(config, stage)) < len(config.stages) - 1:
        path = stage_policy_dir(run_dir, index)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{run_dir}: stage {index} has not finished (no {path})")
        checkpointer = ocp.StandardCheckpointer()
        try:
            return engine, checkpointer.restore(path, engine.model.abstract_params())
        finally:
            checkpointer.close()
    # Read-only: export, eval and merge never move, write or delete anything in a run directory.
    ckpt = Checkpoints(run_dir, keep=config.checkpoint.keep, async_save=False, read_only=True)
    try:
        while (found := ckpt.latest_meta()) is not None:
            step_id, meta = found
            if stage is not None and not (meta["done"] and meta["stage"] == len(config.stages) - 1):
                raise FileNotFoundError(f"{run_dir}: the last stage has not finished")
            try:
                state, _ = ckpt.restore(step_id, engine.abstract_state(), data_iter=None)
            except CorruptCheckpoint:
                continue
            return engine, state.params
        raise FileNotFoundError(f"{run_dir}: no usable checkpoint")
    finally:
        ckpt.close()
