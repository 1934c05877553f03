"""A run's writers and the hooks made of them: what `train` and the vmap sweep (per variant) add
around `Engine.fit`.

    run = Run(config, run_dir, label=...)       # checkpoints, metrics log, global step
    hooks = run.hooks(stop=stop, checkpoints=True)
    engine.fit(stage, hooks)

The hooks, in order: count the global step; the non-finite guard (loss and gradient norm);
log the metrics (every `train.log_every` steps and at the stage's end; the progress bar moves
with it); a periodic checkpoint (`checkpoint.every`); the stop signal (save unless this step was
just saved, then stop). Every save first checks that the state is finite (`all_finite`), so a
step that made the weights NaN with a finite loss (a NaN learning rate) stops the run before its
state is written.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np

from rsa_jax.config import Config
from rsa_jax.training._checkpoint import Checkpoints
from rsa_jax.training._control import NonFiniteError, StopSignal, check_finite
from rsa_jax.training._hooks import Hooks, StepInfo, all_finite
from rsa_jax.training._logging import MetricsLog
from rsa_jax.training._rundir import CheckpointMeta, RunDir
from rsa_jax.training._trackers import flatten

log = logging.getLogger(__name__)


class Run:
    """One run directory's checkpoints and metrics log, its global step, and its hooks."""

    def __init__(
        self,
        config: Config,
        run_dir: str,
        *,
        resolved: str,
        label: str | None = None,
        progress: bool | None = None,
        flops_per_token: float = 0.0,
        async_save: bool | None = None,
    ):
        self.config, self.label = config, label
        self.layout = RunDir(run_dir)
        self.resolved_text = resolved  # `to_json` of the config: config.json's text
        self.resolved: dict = json.loads(resolved)
        self._config_written = False
        self.ckpt = Checkpoints(
            run_dir,
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save if async_save is None else async_save,
        )
        self.metrics = MetricsLog(
            run_dir,
            progress=config.train.progress_bar if progress is None else progress,
            flops_per_token=flops_per_token,
            label=label,
            report_to=config.train.report_to,
            params=flatten(self.resolved),
        )
        self.global_step = 0
        self.last_saved: int | None = None  # global step of this run's newest checkpoint
        self.rng = np.asarray(jax.random.key_data(jax.random.key(config.train.seed))).tolist()

    def close(self) -> None:
        try:
            self.ckpt.close()
        finally:
            self.metrics.close()

    # ------------------------------------------------------------------------------ saving
    def save(
        self, index: int, state, *, stage_step: int, done: bool, data_iter, reference=None
    ) -> None:
        """Checkpoint `global_step` of stage `index`; refuses (NonFiniteError) a state holding
        a NaN or infinite value, leaving the run's last checkpoint as it was."""
        if not all_finite(state):
            raise NonFiniteError(
                f"{self._where(index)} step {stage_step}: the parameters or optimizer state hold "
                f"NaN or infinite values; stopped before saving ({self._kept()}). Check "
                "optim.learning_rate and the stage's hyperparameters for nan/inf, try a lower "
                "learning rate or optim.max_grad_norm > 0"
            )
        meta = CheckpointMeta(index, stage_step, done, self.rng, self.resolved)
        self.ckpt.save(
            self.global_step, state, meta=meta.to_dict(), data_iter=data_iter, reference=reference
        )
        self.last_saved = self.global_step
        if not self._config_written:
            # The run has really started: its readable config (the checkpoint holds the truth).
            if jax.process_index() == 0:
                self.layout.write_config(self.resolved_text)
            self._config_written = True

    def _where(self, index: int) -> str:
        name = self.config.stages[index].name
        return (f"[{self.label}] " if self.label else "") + f"stage {name!r}"

    def _kept(self) -> str:
        if self.last_saved is None:
            return "no checkpoint was written by this run"
        return (
            f"the last checkpoint (step {self.last_saved}) is untouched and a rerun resumes from it"
        )

    # ------------------------------------------------------------------------------- hooks
    def hooks(
        self,
        *,
        stop: StopSignal | None = None,
        save=None,
        report_compile: bool = True,
        evaluate=None,
        candidate=None,
    ) -> Hooks:
        """The run's per-step hooks. `save(info)` writes a mid-stage checkpoint of the step
        (None: no periodic checkpoints and no save on a stop signal); `stop`: the stop flag
        (None: the loop is not stopped by signals); `evaluate(info) -> {"eval/...": value}`:
        the held-out evaluation, logged every `train.eval_every` steps and at the stage's end
        (None: none); `candidate(info)` keeps the policy as a frontier candidate every
        `checkpoint.candidates_every` steps, not at the stage's end (None: none)."""
        hooks = Hooks()
        hooks.add(self._count)
        hooks.add(self._guard)
        if report_compile:
            hooks.add(_report_compile)
        hooks.add(self._log, every=self.config.train.log_every, at_end=True)
        if evaluate is not None and self.config.train.eval_every:
            hooks.add(
                lambda info: self.metrics.log_eval(
                    info.stage.index, info.step, self.global_step, evaluate(info)
                ),
                every=self.config.train.eval_every,
                at_end=True,
            )
        keep = self.config.checkpoint.candidates_every
        if candidate is not None and keep:
            hooks.add(lambda info: None if info.last else candidate(info), every=keep)
        every = self.config.checkpoint.every
        if save is not None and every:
            hooks.add(lambda info: None if info.last else save(info), every=every)
        if stop is not None:
            hooks.add(lambda info: self._stop(info, stop, save))
        return hooks

    def _count(self, info: StepInfo) -> None:
        self.global_step += 1

    def _guard(self, info: StepInfo) -> None:
        """A NaN/inf loss or gradient norm stops the run before anything is saved."""
        values = info.values()
        check_finite(
            {k: values[k] for k in ("loss", "grad_norm") if k in values},
            stage=(f"[{self.label}] " if self.label else "") + info.stage.config.name,
            step=info.step,
            last_checkpoint=self.last_saved,
        )

    def _log(self, info: StepInfo) -> None:
        metrics = dict(info.values())
        if info.compile_seconds > 0:  # kept out of the step time and throughput
            metrics["compile_s"] = info.compile_seconds
        tokens = metrics.pop("tokens")  # global, all hosts
        pairs = self.config.data.batch_size  # global
        self.metrics.log(
            info.stage.index, info.step, self.global_step, metrics, tokens, pairs, info.seconds
        )

    def _stop(self, info: StepInfo, stop: StopSignal, save) -> bool:
        # Asked after every step, the last included: with several processes each call is a
        # step of JAX's preemption sync protocol, which must count the same steps everywhere.
        if not stop.at_step() or info.last:
            return False
        if save is not None and self.last_saved != self.global_step:
            save(info)
        return True


def _report_compile(info: StepInfo) -> None:
    if info.compile_seconds > 0:
        log.info(
            "stage %d step %d compiled in %.1f s",
            info.stage.index,
            info.step,
            info.compile_seconds,
        )
