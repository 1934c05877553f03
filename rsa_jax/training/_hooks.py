"""Per-step work around the one training loop: small hooks registered on `Hooks`, which
`Engine.fit` calls after every step (levanter's `Trainer.add_hook(fn, every=N)`, tunix's
training hooks).

    hooks = Hooks()
    hooks.add(guard)                               # every step
    hooks.add(log_metrics, every=10, at_end=True)  # steps 10, 20, ... and the stage's last
    engine.fit(stage, hooks)

A hook takes a `StepInfo` and returns True to ask the loop to stop (a stop signal); the hooks
of one step all run, in the order they were added, so a hook added after the checkpoint hook
sees the step's checkpoint written. The trainer (`_trainer.py`) and the vmap sweep (one set of
hooks per variant, fed `StepInfo.variant(j)`) build theirs from the same pieces of `Run`.

`all_finite(tree)`: one device reduction saying whether every float in a tree is finite; the
trainer calls it on the state before each checkpoint, so no checkpoint holds NaN weights even
when the loss and gradient norm of the step that made them were finite (a NaN learning rate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step.

    `stage`: the running `Stage` (its state already advanced); `metrics`: the step's metrics
    (device arrays, [K] under vmap, or host floats for a variant's view); `seconds`: the step's
    wall time without compilation; `compile_seconds`: time spent tracing and compiling during
    the step (0 once compiled); `step`: the stage step just finished (1-based)."""

    stage: Any
    metrics: dict
    seconds: float
    compile_seconds: float
    step: int
    _host: dict[str, float] | None = dataclasses.field(default=None, repr=False)

    @property
    def total(self) -> int:
        return self.stage.total

    @property
    def last(self) -> bool:
        """The stage's last step."""
        return self.step >= self.stage.total

    def values(self) -> dict[str, float]:
        """The metrics as host floats (fetched once per step, shared by the hooks)."""
        if self._host is None:
            self._host = {k: float(np.asarray(v)) for k, v in jax.device_get(self.metrics).items()}
        return self._host

    def variant(self, j: int) -> StepInfo:
        """Variant j's view of a vmapped step: its metrics ([K] sliced, shared scalars kept)."""
        metrics = jax.device_get(self.metrics)
        one = {k: _variant_value(v, j) for k, v in metrics.items()}
        return StepInfo(self.stage, one, self.seconds, self.compile_seconds, self.step, one)


def _variant_value(value, j: int) -> float:
    """Variant j's metric: [K] in a vmapped stage, one scalar for all in a shared stage."""
    value = np.asarray(value)
    return float(value if value.ndim == 0 else value[j])


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], bool | None]
    every: int = 1
    at_end: bool = False  # also on the stage's last step when it is not a multiple of `every`

    def due(self, info: StepInfo) -> bool:
        return (self.every > 0 and info.step % self.every == 0) or (self.at_end and info.last)


class Hooks:
    """An ordered list of hooks; callable as `Engine.fit`'s `on_step`."""

    def __init__(self) -> None:
        self.hooks: list[Hook] = []

    def add(
        self, fn: Callable[[StepInfo], bool | None], *, every: int = 1, at_end: bool = False
    ) -> Hooks:
        """Runs `fn(info)` after steps that are multiples of `every` (every step by default;
        `every=0`: never, unless `at_end`), and with `at_end` after the stage's last step."""
        self.hooks.append(Hook(fn, every, at_end))
        return self

    def run(self, info: StepInfo) -> bool:
        """Runs the hooks due at this step; True when one of them asks to stop."""
        stop = False
        for hook in self.hooks:
            if hook.due(info) and hook.fn(info):
                stop = True
        return stop

    def __call__(self, stage, metrics, seconds: float, compile_seconds: float) -> bool:
        step = int(np.asarray(stage.state.step).reshape(-1)[0])
        return self.run(StepInfo(stage, metrics, seconds, compile_seconds, step))


@jax.jit
def _finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree) -> bool:
    """Whether every floating-point value in `tree` is finite (one reduction on the devices)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_finite(leaves)) if leaves else True
