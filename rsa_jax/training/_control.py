"""How a run ends: stop signals from the very start, the non-finite guard, and exit codes.

Exit codes of `rsa-jax train` (the launch scripts act on them):

    0   EXIT_DONE        every stage finished (also when SIGTERM arrived during the last step)
    1   EXIT_FAILED      any other error (a bug, non-finite loss, a checkpoint write that failed)
    2   EXIT_CONFIG      bad config or input: fix it and rerun (requeueing would fail again)
    75  EXIT_PREEMPTED   stopped by SIGTERM/SIGINT before the end, state saved: rerun the same
                         command to resume (EX_TEMPFAIL from sysexits.h, "try again later")
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator, Mapping

log = logging.getLogger(__name__)

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75

_STATUS_CODES = {"done": EXIT_DONE, "preempted": EXIT_PREEMPTED}


def exit_code(status: str) -> int:
    """The process exit code of a run's final status ("done" or "preempted")."""
    try:
        return _STATUS_CODES[status]
    except KeyError:
        raise ValueError(f"unknown run status {status!r} (expected done or preempted)") from None


class StopSignal:
    """SIGTERM/SIGINT set `raised` instead of killing the process; install it first thing in
    the trainer, so that a signal during start-up (mesh, model loading, compilation) also ends
    the run cleanly at the next `should_stop` check instead of with a traceback.

    `pending`: the list an earlier, plain handler appends signal names to, installed before the
    seconds of imports that precede the trainer (this module is stdlib-only, but importing it
    through `rsa_jax.training` loads JAX):

        pending = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: pending.append(signal.Signals(signum).name))
        from rsa_jax.training import StopSignal, train
        stop = StopSignal(pending)   # sees what arrived before and until `installed()`

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once.

    Several processes (`jax.distributed` initialized): a signal to one process must stop all
    of them at the same step, or the others wait in a collective for a partner that left.
    JAX's coordination service already owns SIGTERM there (its preemption notifier replaces
    this handler and tells every process); SIGINT, and signals that arrived before the
    processes joined, are sent on to it as SIGTERM. The loop asks `at_step()` once per step:
    it answers True on every process at the same step, JAX's preemption sync point
    (`multihost_utils.reached_preemption_sync_point`, the step after the furthest process's
    step when the notice spread), and until then `raised` stays None on every process.
    """

    def __init__(self, pending: list[str] | None = None):
        self.received: list[str] = pending if pending is not None else []
        self._agreed: str | None = None  # several processes: the stop all of them reached
        self._calls = 0  # several processes: at_step calls, the sync point's counter
        self._forwarded = False

    @property
    def raised(self) -> str | None:
        """The first stop signal's name ("SIGTERM"), or None. Several processes: set on every
        process at once, when `at_step` reaches the agreed stop."""
        if _processes() > 1:
            return self._agreed
        return self.received[0] if self.received else None

    def at_step(self) -> bool:
        """Whether to stop after this step; call it once after every step, on every process.

        One process: a stop signal has arrived. Several: every process reached the step that
        JAX's preemption sync protocol chose after a signal to any of them (the same step on
        all, so they save the same checkpoint)."""
        if _processes() <= 1:
            return self.should_stop()
        if self._agreed is not None:
            return True
        if self.received and not self._forwarded:
            self._forward()  # arrived before the processes joined (start-up)
        from jax.experimental import multihost_utils

        self._calls += 1
        if multihost_utils.reached_preemption_sync_point(self._calls):
            self._agreed = (
                self.received[0] if self.received else "a stop signal to a process of the run"
            )
            log.warning("%s: every process stops at this step, after saving", self._agreed)
            from rsa_jax.training._peers import note_outcome

            note_outcome("preempted")  # leaving after this is not a failure the others wait on
            return True
        return False

    def _forward(self) -> None:
        """Hands this process's stop to JAX's preemption notifier (which owns SIGTERM)."""
        self._forwarded = True
        os.kill(os.getpid(), signal.SIGTERM)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        previous = {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if name == "SIGINT" and "SIGINT" in self.received:
                raise KeyboardInterrupt
            self.received.append(name)
            log.warning("%s received: stopping at the next safe point, after saving", name)
            if _processes() > 1 and not self._forwarded:
                self._forward()

        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGTERM and _processes() > 1:
                continue  # already joined: SIGTERM stays with JAX's preemption notifier
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def should_stop(self) -> bool:
        return self.raised is not None

    def final_status(self, *, finished: bool) -> str:
        """The run's status: "done" when every stage finished, whatever arrived during the last
        step; otherwise "preempted" (a signal stopped the run early)."""
        if finished:
            return "done"
        if self.raised is None:
            raise RuntimeError("the run stopped early without a stop signal")
        return "preempted"


def _processes() -> int:
    """The number of JAX processes once `jax.distributed` is initialized; 1 before (and when
    JAX was never imported: this module stays importable without it)."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return 1
    return jax.process_count()


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient norm: the run stops before saving anything."""


def check_finite(
    metrics: Mapping[str, float],
    *,
    stage: str,
    step: int,
    keys: tuple[str, ...] = ("loss", "grad_norm"),
    last_checkpoint: int | None = None,
) -> None:
    """Raises NonFiniteError when any of `keys` in `metrics` (host floats) is NaN or infinite.

    Call it after every step, before any save: the update of a step whose gradient norm is not
    finite has already made the parameters non-finite, so the state must not be written.
    """
    bad = {k: metrics[k] for k in keys if k in metrics and not math.isfinite(float(metrics[k]))}
    if not bad:
        return
    values = ", ".join(f"{k}={v}" for k, v in bad.items())
    kept = (
        f"the last checkpoint (step {last_checkpoint}) is untouched and a rerun resumes from it"
        if last_checkpoint is not None
        else "no checkpoint was written by this run"
    )
    raise NonFiniteError(
        f"stage {stage!r} step {step}: {values}; stopped before saving ({kept}). Try a lower "
        "optim.learning_rate, optim.max_grad_norm > 0, model.compute_dtype=float32, or check the "
        "stage's data"
    )
