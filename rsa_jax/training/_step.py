"""The jitted train step: policy fwd+bwd and frozen reference fwd, the pair-loss head, AdamW.

Dimension legend: B pairs per step, K microbatches, b = B / K pairs per microbatch, L tokens,
D model width, V vocabulary.

Microbatches run in a `lax.scan`; each returns the SUM of its per-pair losses and gradients, and
the step divides by the total pair count once, so K microbatches of b pairs give the same update
as one batch of B pairs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rsa_jax.config import OptimConfig, StageConfig
from rsa_jax.losses import fused_pair_loss, logits_pair_loss, quantile_tail
from rsa_jax.training._model import ModelSpec

BATCH_KEYS = ("input_ids", "positions", "attention_mask", "labels", "loss_mask")


class TrainState(NamedTuple):
    params: dict  # flat policy parameters, float32 master weights
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar, optimizer steps taken in this stage


def weight_decay_mask(params: dict) -> dict:
    """Decay matrices only: no weight decay on norms and biases (rank < 2)."""
    return {k: v.ndim >= 2 for k, v in params.items()}


# Traced hyperparameters: changing any of them never recompiles the step, so every stage and
# every sweep variant with the same shapes and kernel reuses one compiled program.
LOSS_KEYS = ("beta", "alpha", "mu", "gamma", "tail")
OPTIM_KEYS = (
    "learning_rate",
    "warmup_steps",
    "decay_steps",
    "final_lr_ratio",
    "weight_decay",
    "max_grad_norm",
)
HYPER_KEYS = LOSS_KEYS + OPTIM_KEYS


def learning_rate_at(step, hyper: dict):
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate *
    final_lr_ratio` at `decay_steps`; every argument may be traced.

    The same curve as `optax.warmup_cosine_decay_schedule(0, lr, warmup, decay, lr * ratio)`.
    """
    step = jnp.asarray(step, jnp.float32)
    peak, warmup = hyper["learning_rate"], hyper["warmup_steps"]
    decay = jnp.maximum(hyper["decay_steps"] - warmup, 1.0)
    warm = peak * step / jnp.maximum(warmup, 1.0)
    t = jnp.clip(step - warmup, 0.0, decay) / decay
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    ratio = hyper["final_lr_ratio"]
    cooled = peak * ((1.0 - ratio) * cosine + ratio)
    return jnp.where(step < warmup, warm, cooled)


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """The stage's learning-rate schedule as a function of the step (for plots and logs)."""
    hyper = optim_hyper(optim, total_steps)
    return lambda step: learning_rate_at(step, hyper)


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """Adam's update direction. Clipping, decoupled weight decay and the learning rate are
    applied by the step with traced values (`apply_update`), which together make AdamW."""
    return optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps)


def optim_hyper(optim: OptimConfig, total_steps: int) -> dict:
    warmup = int(optim.warmup_ratio * total_steps)
    return dict(
        learning_rate=jnp.float32(optim.learning_rate),
        warmup_steps=jnp.float32(warmup),
        decay_steps=jnp.float32(max(total_steps, warmup + 1)),
        final_lr_ratio=jnp.float32(optim.final_lr_ratio),
        weight_decay=jnp.float32(optim.weight_decay),
        max_grad_norm=jnp.float32(optim.max_grad_norm),
    )


def apply_update(tx, grads, opt_state, params, step, hyper):
    """Global-norm clipping (off where max_grad_norm <= 0), Adam, decoupled weight decay on
    matrices, learning-rate schedule: `(params, opt_state, grad_norm, lr)`."""
    norm = optax.global_norm(grads)
    limit = hyper["max_grad_norm"]
    clip = jnp.where((limit > 0) & (norm > limit), limit / norm, 1.0)
    grads = jax.tree.map(lambda g: g * clip.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    lr = learning_rate_at(step, hyper)
    decay = weight_decay_mask(params)
    params = {
        k: p - lr * (updates[k] + (hyper["weight_decay"] * p if decay[k] else 0.0))
        for k, p in params.items()
    }
    return params, opt_state, norm, lr


def loss_kwargs(stage: StageConfig) -> tuple[dict, dict]:
    """(static kwargs that select the kernel, traced loss hyperparameters)."""
    static = dict(
        loss=stage.loss, risk=stage.risk, version=stage.version, split_vocab=stage.split_vocab
    )
    hyper = {k: jnp.float32(getattr(stage, k)) for k in LOSS_KEYS if k != "tail"}
    # 1 - mu rounded from float64 on the host, as torch.quantile ranks it (cvar_reference).
    hyper["tail"] = quantile_tail(float(stage.mu))
    return static, hyper


def stage_hyper(stage: StageConfig, optim: OptimConfig, total_steps: int) -> dict:
    """Every traced hyperparameter of a stage (HYPER_KEYS)."""
    return {**loss_kwargs(stage)[1], **optim_hyper(optim, total_steps)}


def split_microbatches(batch: dict, k: int) -> dict:
    """[2B, L] (B chosen rows, then B rejected) -> [K, 2b, L], each keeping its pairs together."""

    def one(x):
        two_b = x.shape[0]
        x = x.reshape(2, k, two_b // (2 * k), *x.shape[1:])  # [2, K, b, L]
        x = jnp.swapaxes(x, 0, 1)  # [K, 2, b, L]
        return x.reshape(k, two_b // k, *x.shape[3:])  # [K, 2b, L]

    return {key: one(batch[key]) for key in BATCH_KEYS}


def pair_losses(spec: ModelSpec, params, ref_params, mb, static, hyper, head, chunk_size):
    """Per-pair losses [b] and metrics for one microbatch."""
    policy = spec.module(params)
    reference = spec.module(jax.lax.stop_gradient(ref_params))
    args = (mb["input_ids"], mb["positions"], mb["attention_mask"])
    hidden = policy(*args)  # [2b, L, D]
    ref_hidden = jax.lax.stop_gradient(reference(*args))
    if head == "fused":
        return fused_pair_loss(
            hidden,
            policy.unembedding(),
            ref_hidden,
            jax.lax.stop_gradient(reference.unembedding()),
            mb["labels"],
            mb["loss_mask"],
            chunk_size=chunk_size,
            **static,
            **hyper,
        )
    return logits_pair_loss(
        policy.logits(hidden),
        jax.lax.stop_gradient(reference.logits(ref_hidden)),
        mb["labels"],
        mb["loss_mask"],
        **static,
        **hyper,
    )


def make_train_step(
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    static: dict,
    *,
    microbatches: int,
    head: str = "fused",
    chunk_size: int = 64,
):
    """`step(state, ref_params, batch, hyper) -> (state, metrics)`, not yet jitted.

    `static` selects the kernel (loss_kwargs' first result); `hyper` holds HYPER_KEYS, traced.
    """
    lossf = functools.partial(pair_losses, spec, static=static, head=head, chunk_size=chunk_size)

    def summed(params, ref_params, mb, hyper):
        losses, metrics = lossf(params, ref_params, mb, hyper={k: hyper[k] for k in LOSS_KEYS})
        sums = {k: jnp.sum(v.astype(jnp.float32)) for k, v in metrics.items()}
        return jnp.sum(losses), (sums, jnp.float32(losses.shape[0]))

    grad_fn = jax.value_and_grad(summed, has_aux=True)

    def step(state: TrainState, ref_params, batch, hyper):
        micro = split_microbatches(batch, microbatches)
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
        params, opt_state, grad_norm, lr = apply_update(
            tx, grads, state.opt_state, state.params, state.step, hyper
        )
        metrics = {k: v / count for k, v in m_sum.items()}
        metrics["loss"] = l_sum / count
        metrics["grad_norm"] = grad_norm
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


def jit_step(step, state_sh, ref_sh, batch_sh, replicated):
    """Donated state, explicit in/out shardings."""
    batch_shardings = {k: batch_sh for k in BATCH_KEYS}
    hyper_sh = {k: replicated for k in HYPER_KEYS}
    return jax.jit(
        step,
        in_shardings=(state_sh, ref_sh, batch_shardings, hyper_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )


# Jitted steps by everything that shapes the program (model, mesh, kernel, shardings); the
# hyperparameters are arguments, so stages and sweep variants that agree here share one compile.
_STEP_CACHE: dict = {}


def _sharding_key(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple(leaves))


def build_stage_step(
    spec: ModelSpec,
    optim: OptimConfig,
    stage: StageConfig,
    total_steps: int,
    state_sh,
    batch_sh,
    replicated,
    *,
    microbatches: int = 1,
    head: str = "fused",
    chunk_size: int = 64,
):
    """A stage's jitted step and its traced hyperparameters placed replicated: `(step, hyper)`.

    The step comes from a cache: a stage or run whose model, mesh, kernel (loss, risk, version,
    split), Adam constants, microbatching and head agree with an earlier one gets the same jitted
    function, and so the same compiled program for the same batch shapes.
    """
    static, _ = loss_kwargs(stage)
    key = (
        spec.key,
        tuple(sorted(static.items())),
        (optim.b1, optim.b2, optim.eps),
        microbatches,
        head,
        chunk_size,
        _sharding_key(state_sh),
        batch_sh,
        replicated,
    )
    step = _STEP_CACHE.get(key)
    if step is None:
        tx = make_optimizer(optim)
        step = jit_step(
            make_train_step(
                spec, tx, static, microbatches=microbatches, head=head, chunk_size=chunk_size
            ),
            state_sh,
            spec.shardings,
            batch_sh,
            replicated,
        )
        _STEP_CACHE[key] = step
    hyper = stage_hyper(stage, optim, total_steps)
    return step, jax.device_put(hyper, replicated)


def clear_step_cache() -> None:
    _STEP_CACHE.clear()
