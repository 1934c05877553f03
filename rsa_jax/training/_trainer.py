"""`train(config)`: the stages of a config on the engine, with checkpoints, metrics and signals.

    engine -> lock -> where to start (newest usable checkpoint, its config compared with this
    one) -> for each stage: prepare, fit with the run's hooks (`Run.hooks`), save

The per-step work (guard, metrics, periodic checkpoints, the stop signal) is the hooks of
`_run.Run`; the run directory's names and the checkpoint metadata are `_rundir`'s. Checkpoints
carry everything needed to resume mid-stage or between stages (policy, optimizer
state, the reference when it is a trained stage, the data iterator position, the stage index);
a checkpoint that fails to restore is set aside and the one before it is used. SIGTERM/SIGINT
finish the current step, save and return "preempted".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from rsa_jax.config import Config, check_data_files, from_json, to_json
from rsa_jax.training._checkpoint import Checkpoints, CorruptCheckpoint, abstract_like
from rsa_jax.training._control import StopSignal
from rsa_jax.training._engine import Engine, Stage, steps_done
from rsa_jax.training._logging import read_metrics
from rsa_jax.training._mesh import Layout, make_mesh, maybe_initialize_distributed
from rsa_jax.training._peers import note_outcome
from rsa_jax.training._run import Run
from rsa_jax.training._rundir import (
    CheckpointMeta,
    RunDir,
    RunDirError,
    absolute_paths,
    check_resume,
    config_diff,
)
from rsa_jax.training._rundir import finished as finished_checkpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    status: str  # "done" or "preempted"
    global_step: int
    params: dict | None  # final policy parameters (flat dict); None when preempted


class _Trainer:
    """`train`'s side of a run: the run's writers (`Run`), where to start, and each stage's fit
    with the run's hooks and its final save."""

    def __init__(self, engine: Engine, resolved: str, label: str | None = None):
        config = engine.config
        self.engine = engine
        model = engine.model.full or engine.model  # FLOPs: every weight, frozen ones too
        n_params = sum(int(np.prod(v.shape)) for v in model.abstract_params().values())
        peak = config.train.peak_tflops * 1e12 * engine.layout.mesh.size
        self.run = Run(
            config,
            config.train.run_dir,
            resolved=resolved,
            label=label,
            flops_per_token=8.0 * n_params / peak if peak else 0.0,
        )
        self.ckpt = self.run.ckpt

    @property
    def global_step(self) -> int:
        return self.run.global_step

    def close(self) -> None:
        self.run.close()

    def save(self, stage: Stage, *, done: bool) -> None:
        self.run.save(
            stage.index,
            stage.state,
            stage_step=steps_done(stage.state),
            done=done,
            data_iter=stage.batches,
            reference=self.engine.saved_reference(stage),
        )

    def starting_point(self) -> tuple[int, dict | None, Stage | None]:
        """(first stage to run, its starting policy, or a mid-stage Stage restored from the
        newest usable checkpoint). A checkpoint that fails to restore is set aside by
        `Checkpoints` and the one before it is tried."""
        engine = self.engine
        checked = False
        while (found := self.ckpt.latest_meta()) is not None:
            step_id, raw = found
            meta = CheckpointMeta.from_dict(raw, f"{self.ckpt.directory}/{step_id}")
            if not checked:  # the newest checkpoint's own config, whatever config.json says
                self.check_resume(meta.config)
                checked = True
            try:
                if meta.done:  # between stages: the finished policy starts the next stage
                    state, _ = self.ckpt.restore(step_id, engine.abstract_state(), data_iter=None)
                    run_dir, finished = engine.config.train.run_dir, meta.stage
                    last = finished == len(engine.config.stages) - 1
                    if not last and not finished_checkpoint(stage_policy_dir(run_dir, finished)):
                        # killed between the stage's last checkpoint and its policy copy
                        save_stage_policy(run_dir, finished, state.params)
                    self.run.global_step = step_id
                    log.info("resuming after stage %d (checkpoint %d)", meta.stage, step_id)
                    return meta.stage + 1, state.params, None
                stage = engine.stage(meta.stage, engine.initial)
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
            self.run.global_step = step_id
            log.info("resumed stage %d at step %d", stage.index, steps_done(stage.state))
            return stage.index, None, stage
        return 0, engine.initial, None

    def check_resume(self, saved: dict) -> None:
        """Refuses (ConfigMismatch) to resume checkpoints trained under another config, unless
        `train.resume=force`; config.json is only rewritten by this run's first save."""
        config = self.engine.config
        run_dir = config.train.run_dir
        force = config.train.resume == "force"
        differ = check_resume(run_dir, self.run.resolved, force=force, saved=saved)
        if differ:
            log.warning("resuming %s with other values of %s (train.resume=force)", run_dir, differ)

    def run_stage(self, stage: Stage, stop: StopSignal) -> bool:
        """Fits the stage with the run's hooks (guard, logging, held-out evaluation, periodic
        checkpoints, candidates kept along training, the stop flag); saves the stage's final
        checkpoint. False when stopped by a signal before the stage's end."""
        config = self.engine.config
        heldout = self.engine.heldout_batches(stage.index) if config.train.eval_every else []
        hooks = self.run.hooks(
            stop=stop,
            save=lambda info: self.save(info.stage, done=False),
            evaluate=lambda info: self.engine.evaluate(info.stage, heldout),
            candidate=lambda info: save_candidate(
                config.train.run_dir, info.stage.index, info.step, info.stage.state.params
            ),
        )
        self.run.metrics.start_stage(
            stage.index, stage.config.name, stage.total, steps_done(stage.state)
        )
        if not self.engine.fit(stage, hooks):
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
        self.run.metrics.end_stage()
        return True


def train(
    config: Config,
    *,
    tx: optax.GradientTransformation | None = None,
    layout: Layout | None = None,
    stop: StopSignal | None = None,
    label: str | None = None,
    shared_from: tuple[str, int] | None = None,
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

    `shared_from=(other_run_dir, k)`: another run whose config has the same first k stages
    (and everything else that shapes them) has finished them; a run with no checkpoint of its
    own starts at stage k from that run's stage k-1 policy, with its stage policies and metric
    records copied, instead of training the same k stages again (a sequential sweep's shared
    stages). Training is deterministic, so the result is the one training them would give.
    """
    stop = StopSignal() if stop is None else stop
    with stop.installed():  # first: a signal during start-up is a clean stop too
        config = absolute_paths(config)  # checks model.path
        check_data_files(config)  # a wrong path fails at once, before the model loads
        engine = Engine(config, layout=layout, tx=tx)
        note_outcome("failed")  # until it returns: a peer leaving now is waited for, then not
        with RunDir(engine.config.train.run_dir).lock():
            result = _train_locked(engine, stop, label, shared_from)
        note_outcome(result.status)
        return result


def finished_step(config: Config) -> int | None:
    """The global step of the run in `config.train.run_dir` when its newest checkpoint is the
    last stage's final one, made with this config (keys that do not change what is trained
    aside); None otherwise (a new, unfinished or other run: `train` says which). Reads only
    checkpoint metadata: no tokenizer, model or compile, so a rerun of a finished command
    answers at once."""
    config = absolute_paths(config)
    run = RunDir(config.train.run_dir)
    if not run.has_checkpoints():
        return None
    # Orbax asks JAX for the process index, which starts a backend: one process of several
    # must join the others first (jax.distributed.initialize refuses to run after that).
    maybe_initialize_distributed()
    ckpt = Checkpoints(run.path, async_save=False, read_only=True)
    try:
        found = ckpt.latest_meta()
    finally:
        ckpt.close()
    if found is None:
        return None
    meta = CheckpointMeta.from_dict(found[1], f"{ckpt.directory}/{found[0]}")
    if not meta.final(len(config.stages)):
        return None
    if config_diff(meta.config, json.loads(to_json(config))):
        return None
    return found[0]


def _train_locked(
    engine: Engine, stop: StopSignal, label: str | None, shared_from: tuple[str, int] | None
) -> RunResult:
    # Nothing is written before the run's first checkpoint (which writes config.json too): a
    # run that fails before it leaves nothing that would block the corrected rerun.
    config = engine.config
    run = _Trainer(engine, to_json(config), label)
    try:
        first, policy, stage = run.starting_point()
        if shared_from is not None and first == 0 and stage is None:
            first, policy = _start_after_shared(engine, run.run, *shared_from)
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


def _start_after_shared(engine: Engine, run: Run, source: str, k: int) -> tuple[int, dict]:
    """(k, the policy `source` ended stage k-1 with): its stage policies, the candidates kept
    along its first k stages and their metric records are copied into this run, whose global
    step goes on from there."""
    run_dir = engine.config.train.run_dir
    checkpointer = ocp.StandardCheckpointer()
    try:
        policy = checkpointer.restore(
            stage_policy_dir(source, k - 1), engine.model.abstract_params()
        )
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        for i in range(k):
            target = stage_policy_dir(run_dir, i)
            if not os.path.isdir(target):
                shutil.copytree(stage_policy_dir(source, i), target)
        for i, step in RunDir(source).candidates():  # points along the shared stages
            target = RunDir(run_dir).candidate(i, step)
            if i < k and not os.path.isdir(target):
                shutil.copytree(RunDir(source).candidate(i, step), target)
    records = [r for r in read_metrics(RunDir(source).metrics_file) if r["stage"] < k]
    run.metrics.copy_records(records)
    run.global_step = max((int(r["global_step"]) for r in records), default=0)
    log.info("stages 0..%d shared with %s: starting at stage %d", k - 1, source, k)
    return k, policy


def _missing_stage(run: RunDir, newest: CheckpointMeta, index: int, path: str) -> str:
    """Why stage `index`'s policy copy `path` is absent: the stage has not finished, or it
    finished and the copy was deleted (the newest checkpoint says which)."""
    gone = f"{run.path}: stage {index} finished, but the copy of its policy ({path}) is missing"
    if newest.stage == index and newest.done:
        return (
            f"{gone} (deleted?); rerun the run's train command to restore it from the stage's "
            "final checkpoint"
        )
    if newest.stage > index:
        return (
            f"{gone} (deleted?); the run has moved on to a later stage, so only retraining "
            f"stage {index} (in another train.run_dir) gives it back"
        )
    return f"{run.path}: stage {index} has not finished (no {path})"


def stage_policy_dir(run_dir: str, index: int) -> str:
    """Where the policy a (non-final) stage ended with is kept: checkpoint retention never
    deletes it, so RSA(P) can merge the stage-1 and final policies of one run."""
    return RunDir(run_dir).stage_policy(index)


def save_stage_policy(run_dir: str, index: int, params: dict) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(stage_policy_dir(run_dir, index), params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def candidate_dir(run_dir: str, index: int, step: int) -> str:
    """Where the policy at `step` of stage `index` is kept as a frontier candidate
    (`checkpoint.candidates_every`): retention never deletes it, like `stage_policy_dir`."""
    return RunDir(run_dir).candidate(index, step)


def save_candidate(run_dir: str, index: int, step: int, params: dict) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(candidate_dir(run_dir, index, step), params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def list_candidates(run_dir: str) -> list[tuple[int, int]]:
    """[(stage index, step)] of the run's finished candidates, in training order."""
    return RunDir(run_dir).candidates()


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
    compute_dtype: str | None = None,
):
    """(engine, flat policy params) of the newest usable checkpoint of a run directory, or,
    with `stage` (index or name), the policy that stage ended with, or with `STAGE:STEP` the
    candidate kept at that step (`checkpoint.candidates_every`). For a LoRA run these are
    the merged parameters (the base dequantized plus (alpha / r) A B, float32), which
    `engine.model.module(params)` builds; `load_adapters` gives the adapters themselves.

    The engine holds the model definition (`engine.model.module(params)` is the NNX model) and
    the tokenizer. The run's own mesh settings are replaced by data parallelism over every
    device, so a run trained on a pod slice loads on one machine; `layout` restores onto another
    mesh instead (evaluation on the training mesh). The model computes in the run's
    `model.compute_dtype` (what it trained in) unless `compute_dtype` ("float32", "bfloat16")
    says otherwise; the parameters are float32 either way, as `export` writes them.
    """
    engine, params = load_adapters(
        run_dir, config, stage=stage, layout=layout, compute_dtype=compute_dtype
    )
    return engine, engine.merged(params)


def load_adapters(
    run_dir: str,
    config: Config | None = None,
    *,
    stage: str | int | None = None,
    layout: Layout | None = None,
    compute_dtype: str | None = None,
):
    """(engine, the trained parameters as checkpointed): `load_policy` without the merge, so
    for a LoRA run the adapters (`engine.base` is the frozen base, `engine.model.lora` the
    spec: what `save_merged_hf` and `save_peft` take)."""
    run = RunDir(run_dir)
    if (holder := run.holder()) is not None:
        log.warning(
            "%s is being trained now (%s): loading what its checkpoints hold at this moment",
            run.path,
            holder,
        )
    # Read-only: export, eval and merge never move, write or delete anything in a run directory.
    ckpt = Checkpoints(run.path, async_save=False, read_only=True)
    try:
        found = ckpt.latest_meta()
        if found is None:
            raise FileNotFoundError(f"{run.path}: no usable checkpoint")
        newest = CheckpointMeta.from_dict(found[1], f"{ckpt.directory}/{found[0]}")
        if config is None:  # the run's own config, as its checkpoints recorded it
            config = _checkpoint_config(run, newest)
        if compute_dtype is not None:
            model = dataclasses.replace(config.model, compute_dtype=compute_dtype)
            config = dataclasses.replace(config, model=model)
        if layout is None:
            mesh = make_mesh(dataclasses.replace(config.mesh, data=-1, fsdp=1, tensor=1))
            layout = Layout(mesh, config.mesh.rules)
        engine = Engine(config, layout=layout, check_devices=False)
        n_stages = len(config.stages)
        if stage is not None and (step := split_candidate(stage)[1]) is not None:
            index = stage_index(config, split_candidate(stage)[0])
            path = run.candidate(index, step)
            if not finished_checkpoint(path):
                kept = [f"{i}:{s}" for i, s in run.candidates()]
                raise FileNotFoundError(
                    f"{run.path}: no candidate at stage {index} step {step} ({path}); kept: "
                    f"{kept or 'none (checkpoint.candidates_every was 0)'}"
                )
            checkpointer = ocp.StandardCheckpointer()
            try:
                return engine, checkpointer.restore(path, engine.model.abstract_params())
            finally:
                checkpointer.close()
        if stage is not None and (index := stage_index(config, stage)) < n_stages - 1:
            path = run.stage_policy(index)
            if not finished_checkpoint(path):
                raise FileNotFoundError(_missing_stage(run, newest, index, path))
            checkpointer = ocp.StandardCheckpointer()
            try:
                return engine, checkpointer.restore(path, engine.model.abstract_params())
            finally:
                checkpointer.close()
        while found is not None:
            step_id, raw = found
            meta = CheckpointMeta.from_dict(raw, f"{ckpt.directory}/{step_id}")
            if stage is not None and not meta.final(n_stages):
                raise FileNotFoundError(f"{run.path}: the last stage has not finished")
            try:
                state, _ = ckpt.restore(step_id, engine.abstract_state(), data_iter=None)
            except CorruptCheckpoint:
                found = ckpt.latest_meta()
                continue
            if not meta.final(n_stages):
                log.warning(
                    "%s has not finished: loading checkpoint %d (stage %d, step %d%s), not a "
                    "final policy",
                    run.path,
                    step_id,
                    meta.stage,
                    meta.stage_step,
                    ", done" if meta.done else "",
                )
            return engine, state.params
        raise FileNotFoundError(f"{run.path}: no usable checkpoint")
    finally:
        ckpt.close()


def run_config(run_dir: str) -> Config:
    """The config a run's newest usable checkpoint was trained with (`config.json` is only its
    readable copy; an edited one is not used)."""
    run = RunDir(run_dir)
    ckpt = Checkpoints(run.path, async_save=False, read_only=True)
    try:
        found = ckpt.latest_meta()
    finally:
        ckpt.close()
    if found is None:
        raise FileNotFoundError(f"{run.path}: no usable checkpoint")
    return _checkpoint_config(
        run, CheckpointMeta.from_dict(found[1], f"{ckpt.directory}/{found[0]}")
    )


def _checkpoint_config(run: RunDir, meta: CheckpointMeta) -> Config:
    """The config a checkpoint was trained with; a `config.json` that says otherwise (edited
    by hand) is named in a warning and not used."""
    config = from_json(json.dumps(meta.config))
    try:
        written = run.read_config()
    except RunDirError as e:
        log.warning("%s; using the checkpoint's own config", e)
        return config
    if written is not None and (differ := config_diff(meta.config, written, ignore=())):
        log.warning(
            "%s differs from the config its checkpoints were trained with (%s); using the "
            "checkpoint's",
            run.config_file,
            ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else ""),
        )
    return config
