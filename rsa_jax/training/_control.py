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
import signal
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
    """

    def __init__(self, pending: list[str] | None = None):
        self.received: list[str] = pending if pending is not None else []

    @property
    def raised(self) -> str | None:
        """The first stop signal's name ("SIGTERM"), or None."""
        return self.received[0] if self.received else None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        previous = {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if name == "SIGINT" and "SIGINT" in self.received:
                raise KeyboardInterrupt
            self.received.append(name)
            log.warning("%s received: stopping at the next safe point, after saving", name)

        for sig in (signal.SIGTERM, signal.SIGINT):
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
