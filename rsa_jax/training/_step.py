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

LoRA adapter dropout (`model.lora.dropout` > 0) needs random masks. They come from a key that is
a pure function of `(train.seed, stage index, stage step, microbatch)`: the stage's key travels
in `hyper.dropout_key` (traced, never donated, stacked over K in a vmap sweep), the step folds
in its own `state.step` and splits one key per microbatch. Why not `nnx.Dropout` with an
`nnx.Rngs` stream: the model is rebuilt from flat dicts inside the jitted step, so a stateful
stream would have to be threaded in and out of the step and checkpointed to resume exactly; a
key derived from the step counter is stateless, so the step stays pure, the donated state
keeps its structure, and a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rsa_jax.config import Config, OptimConfig, StageConfig, traced_fields
from rsa_jax.losses import DEFAULT_CHUNK_SIZE, Kernel, LossHyper, fused_pair_loss, logits_pair_loss
from rsa_jax.training._model import ModelDef
from rsa_jax.training._optim import OptimHyper

_TRACED_STAGE = traced_fields(StageConfig)

BATCH_KEYS = ("input_ids", "positions", "attention_mask", "labels", "loss_mask")
HEADS = ("fused", "logits")


class TrainState(NamedTuple):
    params: dict  # flat policy parameters, float32 master weights
    opt_state: optax.OptState
    step: Any  # int32 scalar jax.Array, optimizer steps taken in this stage


class Hyper(NamedTuple):
    """Every traced input of a stage besides its state and batch: a pytree, so changing a value
    never recompiles and a stack of K of them is vmapped over. `optim` is None with a user's
    optax optimizer; `dropout_key` is the stage's PRNG key of LoRA adapter dropout
    (`stage_dropout_key`), None without dropout (then the step draws nothing)."""

    loss: LossHyper
    optim: OptimHyper | None
    dropout_key: jax.Array | None = None

    @classmethod
    def for_stage(
        cls,
        stage: StageConfig,
        optim: OptimConfig | None,
        total_steps: int,
        dropout_key: jax.Array | None = None,
    ) -> Hyper:
        return cls(
            # The stage's fields declared TRACED in `rsa_jax.config` (beta, alpha, mu, gamma).
            LossHyper.create(risk=stage.risk, **{k: getattr(stage, k) for k in _TRACED_STAGE}),
            None if optim is None else OptimHyper.from_config(optim, total_steps),
            dropout_key,
        )


# A stream of its own for dropout, so its keys never repeat another use of `train.seed`.
_DROPOUT_STREAM = 0xD209


def stage_dropout_key(config: Config, stage_index: int) -> jax.Array | None:
    """The PRNG key of stage `stage_index`'s adapter dropout: `fold_in(fold_in(key(train.seed),
    stream), stage)`; None when the run has no dropout (full fine-tuning or `lora.dropout` 0).

    Variants of a sweep with the same `train.seed` draw the same masks (common random numbers:
    their differences are the hyperparameters', not the masks'); another `train.seed` gives
    other masks."""
    lora = config.model.lora
    if not config.model.uses_lora or lora is None or lora.dropout == 0:
        return None
    key = jax.random.fold_in(jax.random.key(config.train.seed), _DROPOUT_STREAM)
    return jax.random.fold_in(key, stage_index)


def microbatch_dropout_keys(stage_key: jax.Array | None, step, microbatches: int):
    """[K] keys, one per microbatch of stage step `step` (an int32 scalar): `split(fold_in(
    stage_key, step), K)`; None when `stage_key` is None (no dropout)."""
    if stage_key is None:
        return None
    return jax.random.split(jax.random.fold_in(stage_key, step), microbatches)


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
    # Devices the microbatch's rows are split over (`Layout.row_shards`): the loss head's
    # row-block loops then step over each device's own rows (`fused_pair_loss`).
    row_shards: int = 1
    needs_reference = True
    split = staticmethod(split_pairs)

    def __call__(self, model: ModelDef, params, ref_params, mb, hyper: Hyper, dropout_key=None):
        """(sum of per-pair losses, (metric sums, pair count)) of one microbatch. `dropout_key`
        (LoRA with dropout): the microbatch's key, for the policy's adapters only."""
        policy = model.policy(params, ref_params, dropout_key=dropout_key)
        reference = model.reference(ref_params)
        args = (mb["input_ids"], mb["positions"], mb["attention_mask"])
        hidden = policy(*args)  # [2b, L, D]
        ref_hidden = jax.lax.stop_gradient(reference(*args))
        kw = {**self.kernel.kwargs(), **hyper.loss.kwargs(), "row_shards": self.row_shards}
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
    microbatch (no reference). With one microbatch this is the batch's token mean.

    Full fine-tuning: the model of `params` (the frozen argument is None). LoRA: the adapters
    `params` on the frozen base, the step's frozen argument `{"base": base, "adapters": None}`
    (`Engine.frozen(None)`), with adapter dropout when the step has a key."""

    needs_reference = False
    split = staticmethod(split_rows)

    def __call__(self, model: ModelDef, params, frozen, mb, hyper, dropout_key=None):
        del hyper
        module = model.policy(params, frozen, dropout_key=dropout_key)
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
    grad_shardings: Any = None,
    micro_sharding: Any = None,
):
    """`step(state, reference, batch, hyper) -> (state, metrics)`, not yet jitted.
    `micro_sharding` (a sharding of [K, 2b, L], or None): where the microbatches live. Why: the
    split is a reshape of the batch's rows, whose sharding puts whole microbatches on one chip
    each; laid out as the batch was (every microbatch's rows over the batch axes) each scan
    iteration computes on every chip, for one all-to-all of the token ids.
    `grad_shardings` (the parameters' shardings, or None): each microbatch's gradient and their
    sum are laid out as the parameters are. Why: left to propagation, the scan's zero-initialised
    gradient carry comes out replicated, so every microbatch all-reduces the whole gradient over
    the fsdp axis and every chip holds all of it; pinned to the parameters' layout, XLA
    reduce-scatters each microbatch's gradient instead (a quarter of the bytes on fsdp=4, and the
    sum is sharded like the weights)."""

    def summed(params, ref_params, mb, hyper, key):
        return objective(model, params, ref_params, mb, hyper, dropout_key=key)

    def laid_out(grads):
        if grad_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, grad_shardings)

    value_and_grad = jax.value_and_grad(summed, has_aux=True)

    def grad_fn(params, ref_params, mb, hyper, key):
        value, grads = value_and_grad(params, ref_params, mb, hyper, key)
        return value, laid_out(grads)

    def step(state: TrainState, ref_params, batch, hyper: Hyper):
        micro = objective.split(batch, microbatches)
        if micro_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
        # [K] dropout keys, or None (no dropout: no leaf, the program of a run without it)
        keys = microbatch_dropout_keys(hyper.dropout_key, state.step, microbatches)
        if microbatches == 1:
            # One microbatch: no scan. Why: a scan carries a zero gradient tree that XLA
            # materialises, adds to and copies in and out of its loop, parameter by parameter
            # (`bench/profile_step.py` shows it), and the loop boundary keeps the optimizer
            # update from fusing with the gradient. The sums are the scan's (0 + x = x).
            mb0, key0 = jax.tree.map(lambda x: x[0], (micro, keys))
            (l_sum, (m_sum, count)), g_sum = grad_fn(state.params, ref_params, mb0, hyper, key0)
        else:
            (g_sum, l_sum, m_sum, count) = _scan_microbatches(
                grad_fn, state.params, ref_params, micro, keys, hyper, laid_out
            )
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


def make_eval_step(model: ModelDef, objective: Objective, *, microbatches: int = 1):
    """`eval_step(params, reference, batch, hyper) -> sums`, not yet jitted: the objective's
    loss and metrics on a held-out batch without gradient or update (no dropout), as SUMS over
    its pairs with the pair count under "pairs", so batches add up exactly on the host."""

    def summed(params, ref_params, mb, hyper):
        loss_sum, (m_sums, n) = objective(model, params, ref_params, mb, hyper)
        return {"loss": loss_sum, **m_sums, "pairs": n}

    def eval_step(params, ref_params, batch, hyper: Hyper):
        micro = objective.split(batch, microbatches)
        if microbatches == 1:
            return summed(params, ref_params, jax.tree.map(lambda x: x[0], micro), hyper)

        def body(acc, mb):
            return jax.tree.map(jnp.add, acc, summed(params, ref_params, mb, hyper)), None

        mb0 = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda: summed(params, ref_params, mb0, hyper))
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.scan(body, zero, micro)[0]

    return eval_step


def _scan_microbatches(grad_fn, params, ref_params, micro, keys, hyper, laid_out):
    """(gradient sum, loss sum, metric sums, count) over K microbatches [K, ...] in a scan;
    `laid_out` places the zero gradient carry as the gradients are placed."""

    def body(carry, xs):
        mb, key = xs
        g_acc, l_acc, m_acc, n_acc = carry
        (loss_sum, (m_sums, n)), g = grad_fn(params, ref_params, mb, hyper, key)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        m_acc = jax.tree.map(jnp.add, m_acc, m_sums)
        return (g_acc, l_acc + loss_sum, m_acc, n_acc + n), None

    mb0, key0 = jax.tree.map(lambda x: x[0], (micro, keys))
    shapes = jax.eval_shape(lambda: grad_fn(params, ref_params, mb0, hyper, key0))
    m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0][1][0])
    init = (laid_out(jax.tree.map(jnp.zeros_like, params)), jnp.float32(0), m_zero, jnp.float32(0))
    sums, _ = jax.lax.scan(body, init, (micro, keys))
    return sums


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
