"""AdamW with traced hyperparameters: Adam's direction from optax, and clipping, decoupled weight
decay and the warmup + cosine schedule applied with values that are arguments of the step.

Why not `optax.adamw(schedule)`: its learning rate, schedule and clipping norm are Python
constants baked into the compiled program, so every stage and sweep variant with another
learning rate would recompile. Here they are a pytree (`OptimHyper`) passed to the jitted step;
`tests/training/test_step.py` checks the result equals optax's AdamW chain.

A user who wants another optimizer passes an optax transformation to the engine instead
(`Engine(config, tx=...)`); then this module is not used and the transformation's own
hyperparameters are constants of the program.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsa_jax.config import OptimConfig, traced_fields


class OptimHyper(NamedTuple):
    """Traced optimizer hyperparameters of one stage (float32 scalars, or [K] under vmap)."""

    learning_rate: Any
    warmup_steps: Any
    decay_steps: Any
    final_lr_ratio: Any
    weight_decay: Any
    max_grad_norm: Any

    @classmethod
    def from_config(cls, optim: OptimConfig, total_steps: int) -> OptimHyper:
        warmup = int(optim.warmup_ratio * total_steps)
        return cls(
            learning_rate=np.float32(optim.learning_rate),
            warmup_steps=np.float32(warmup),
            decay_steps=np.float32(max(total_steps, warmup + 1)),
            final_lr_ratio=np.float32(optim.final_lr_ratio),
            weight_decay=np.float32(optim.weight_decay),
            max_grad_norm=np.float32(optim.max_grad_norm),
        )


# The OptimConfig fields that only feed `OptimHyper` (traced): variants of a vmap sweep may
# differ in these; b1, b2, eps and microbatches shape the program.
# Declared TRACED next to their fields in `rsa_jax.config.OptimConfig`.
TRACED_OPTIM_FIELDS = traced_fields(OptimConfig)


def learning_rate_at(step, hyper: OptimHyper):
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate *
    final_lr_ratio` at `decay_steps`; every argument may be traced.

    The same curve as `optax.warmup_cosine_decay_schedule(0, lr, warmup, decay, lr * ratio)`.
    """
    step = jnp.asarray(step, jnp.float32)
    peak, warmup = hyper.learning_rate, hyper.warmup_steps
    decay = jnp.maximum(hyper.decay_steps - warmup, 1.0)
    warm = peak * step / jnp.maximum(warmup, 1.0)
    t = jnp.clip(step - warmup, 0.0, decay) / decay
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    ratio = hyper.final_lr_ratio
    cooled = peak * ((1.0 - ratio) * cosine + ratio)
    return jnp.where(step < warmup, warm, cooled)


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """The stage's learning-rate schedule as a function of the step (for plots and logs)."""
    hyper = OptimHyper.from_config(optim, total_steps)
    return lambda step: learning_rate_at(step, hyper)


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """Adam's update direction. Clipping, decoupled weight decay and the learning rate are
    applied by the step with traced values (`apply_update`), which together make AdamW."""
    return optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps)


def weight_decay_mask(params: dict) -> dict:
    """Decay matrices only: no weight decay on norms and biases (rank < 2)."""
    return {k: v.ndim >= 2 for k, v in params.items()}


def apply_update(tx, grads, opt_state, params, step, hyper: OptimHyper):
    """Global-norm clipping (off where max_grad_norm <= 0), Adam, decoupled weight decay on
    matrices, learning-rate schedule: `(params, opt_state, grad_norm, lr)`."""
    norm = optax.global_norm(grads)
    limit = hyper.max_grad_norm
    clip = jnp.where((limit > 0) & (norm > limit), limit / norm, 1.0)
    grads = jax.tree.map(lambda g: g * clip.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    lr = learning_rate_at(step, hyper)
    decay = weight_decay_mask(params)
    params = {
        k: p - lr * (updates[k] + (hyper.weight_decay * p if decay[k] else 0.0))
        for k, p in params.items()
    }
    return params, opt_state, norm, lr


def optax_update(tx, grads, opt_state, params, step, hyper):
    """A user's optax transformation, applied as it is: `(params, opt_state, grad_norm, None)`."""
    del step, hyper
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads), None
