"""The train step: an objective's loss and gradient over microbatches, then the optimizer update.

Dimension legend: B pairs (or rows) per step, K microbatches, b = B / K per microbatch, L tokens,
D model width, V vocabulary.

An objective is what is minimised: `PairObjective` (a preference loss of the policy against a
frozen reference, chosen by a static `Kernel`) or `NextTokenObjective` (SFT cross-entropy).
Microbatches run in a `lax.scan`; each returns the SUM of its losses and gradients and the
count it summed over, and the step divides by the total count once, so K microbatches of b
pairs give the same update as one batch of B pairs.

The step is a pure function `step(state, reference, batch, hyper) -> (state, metrics)`; the
engine jits it with shardings and donation, or vmaps it over K stacked variants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rsa_jax.config import OptimConfig, StageConfig
from rsa_jax.losses import DEFAULT_CHUNK_SIZE, Kernel, LossHyper, fused_pair_loss, logits_pair_loss
from rsa_jax.training._model import ModelDef
from rsa_jax.training._optim import OptimHyper

BATCH_KEYS = ("input_ids", "positions", "attention_mask", "labels", "loss_mask")
HEADS = ("fused", "logits")


class TrainState(NamedTuple):
    params: dict  # flat policy parameters, float32 master weights
    opt_state: optax.OptState
    step: Any  # int32 scalar jax.Array, optimizer steps taken in this stage


class Hyper(NamedTuple):
    """Every traced hyperparameter of a stage: a pytree, so changing a value never recompiles
    and a stack of K of them is vmapped over. `optim` is None with a user's optax optimizer."""

    loss: LossHyper
    optim: OptimHyper | None

    @classmethod
    def for_stage(cls, stage: StageConfig, optim: OptimConfig | None, total_steps: int) -> Hyper:
        return cls(
            LossHyper.create(
                risk=stage.risk, beta=stage.beta, alpha=stage.alpha, mu=stage.mu, gamma=stage.gamma
            ),
            None if optim is None else OptimHyper.from_config(optim, total_steps),
        )


def split_pairs(batch: dict, k: int) -> dict:
    """[2B, L] (B chosen rows, then B rejected) -> [K, 2b, L], each keeping its pairs together."""

    def one(x):
        two_b = x.shape[0]
        x = x.reshape(2, k, two_b // (2 * k), *x.shape[1:])  # [2, K, b, L]
        x = jnp.swapaxes(x, 0, 1)  # [K, 2, b, L]
        return x.reshape(k, two_b // k, *x.shape[3:])  # [K, 2b, L]

    return {key: one(batch[key]) for key in BATCH_KEYS}


def split_rows(batch: dict, k: int) -> dict:
    """[B, L] -> [K, b, L]: consecutive rows per microbatch."""
    return {key: x.reshape(k, x.shape[0] // k, *x.shape[1:]) for key, x in batch.items()}


@dataclasses.dataclass(frozen=True)
class PairObjective:
    """A preference loss of the policy against a frozen reference: per-pair losses summed."""

    kernel: Kernel = Kernel()
    # "fused": hidden states + unembedding into the loss head, C tokens at a time;
    # "logits": the full [2b, L, V] logits of both models.
    head: str = "fused"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    needs_reference = True
    split = staticmethod(split_pairs)

    def __call__(self, model: ModelDef, params, ref_params, mb, hyper: Hyper):
        """(sum of per-pair losses, (metric sums, pair count)) of one microbatch."""
        policy = model.policy(params, ref_params)
        reference = model.reference(ref_params)
        args = (mb["input_ids"], mb["positions"], mb["attention_mask"])
        hidden = policy(*args)  # [2b, L, D]
        ref_hidden = jax.lax.stop_gradient(reference(*args))
        kw = {**self.kernel.kwargs(), **hyper.loss.kwargs()}
        if self.head == "fused":
            losses, metrics = fused_pair_loss(
                hidden,
                policy.unembedding(),
                ref_hidden,
                jax.lax.stop_gradient(reference.unembedding()),
                mb["labels"],
                mb["loss_mask"],
                chunk_size=self.chunk_size,
                **kw,
            )
        else:
            losses, metrics = logits_pair_loss(
                policy.logits(hidden),
                jax.lax.stop_gradient(reference.logits(ref_hidden)),
                mb["labels"],
                mb["loss_mask"],
                **kw,
            )
        sums = {k: jnp.sum(v.astype(jnp.float32)) for k, v in metrics.items()}
        return jnp.sum(losses), (sums, jnp.float32(losses.shape[0]))


@dataclasses.dataclass(frozen=True)
class NextTokenObjective:
    """Supervised fine-tuning: mean next-token cross-entropy over the loss-masked tokens of the
    microbatch (no reference). With one microbatch this is the batch's token mean."""

    needs_reference = False
    split = staticmethod(split_rows)

    def __call__(self, model: ModelDef, params, ref_params, mb, hyper):
        del ref_params, hyper
        module = model.module(params)
        hidden = module(mb["input_ids"], mb["positions"], mb["attention_mask"])
        logp = jax.nn.log_softmax(module.logits(hidden), axis=-1)
        nll = -jnp.take_along_axis(logp, mb["labels"][..., None], axis=-1)[..., 0]
        mask = mb["loss_mask"]
        loss = jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.sum(mask)
        return loss, ({}, jnp.float32(1.0))


Objective = PairObjective | NextTokenObjective
# update(tx, grads, opt_state, params, step, optim_hyper) -> (params, opt_state, norm, lr)
Update = Callable[..., tuple[Any, Any, jax.Array, jax.Array | None]]


def make_train_step(
    model: ModelDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    update: Update,
    *,
    microbatches: int = 1,
):
    """`step(state, reference, batch, hyper) -> (state, metrics)`, not yet jitted."""

    def summed(params, ref_params, mb, hyper):
        return objective(model, params, ref_params, mb, hyper)

    grad_fn = jax.value_and_grad(summed, has_aux=True)

    def step(state: TrainState, ref_params, batch, hyper: Hyper):
        micro = objective.split(batch, microbatches)
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry, mb):
            g_acc, l_acc, m_acc, n_acc = carry
            (loss_sum, (m_sums, n)), g = grad_fn(state.params, ref_params, mb, hyper)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            m_acc = jax.tree.map(jnp.add, m_acc, m_sums)
            return (g_acc, l_acc + loss_sum, m_acc, n_acc + n), None

        shapes = jax.eval_shape(
            lambda: grad_fn(state.params, ref_params, jax.tree.map(lambda x: x[0], micro), hyper)
        )
        m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0][1][0])
        init = (zeros, jnp.float32(0), m_zero, jnp.float32(0))
        (g_sum, l_sum, m_sum, count), _ = jax.lax.scan(body, init, micro)
        grads = jax.tree.map(lambda g: g / count, g_sum)
        params, opt_state, grad_norm, lr = update(
            tx, grads, state.opt_state, state.params, state.step, hyper.optim
        )
        metrics = {k: v / count for k, v in m_sum.items()}
        metrics["loss"] = l_sum / count
        metrics["grad_norm"] = grad_norm
        if lr is not None:
            metrics["learning_rate"] = lr
        # Real tokens of the GLOBAL batch (every host's rows), for tokens/s and MFU.
        metrics["tokens"] = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def opt_state_shardings(tx: optax.GradientTransformation, params: dict, replicated) -> object:
    """Moments take their parameter's sharding; scalars (`count`) are replicated."""
    abstract = jax.eval_shape(tx.init, params)

    def pick(path, leaf):
        last = path[-1] if path else None
        name = getattr(last, "key", None)
        if isinstance(name, str) and name in params and params[name].shape == leaf.shape:
            return params[name].sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract)


def init_state(params: dict, tx: optax.GradientTransformation, replicated) -> TrainState:
    """Optimizer state created directly sharded, with every leaf (the `count` scalars too)
    committed, so the first and later steps see the same shardings (one compile)."""
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, replicated))(params)
    return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), replicated))


def state_shardings(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, state)
