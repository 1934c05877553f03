"""Sharded training: mesh and logical-axis rules, the jitted train step, Orbax checkpoints,
the multi-stage RSA trainer."""

from rsa_jax.training._mesh import (
    batch_sharding,
    logical_spec,
    make_mesh,
    maybe_initialize_distributed,
    place_batch,
    replicated,
)
from rsa_jax.training._model import ModelSpec, build_spec, init_params, llama_config, load_tokenizer
from rsa_jax.training._step import (
    TrainState,
    build_stage_step,
    init_state,
    jit_step,
    loss_kwargs,
    make_optimizer,
    make_schedule,
    make_train_step,
    split_microbatches,
    state_shardings,
    weight_decay_mask,
)

__all__ = [
    "ModelSpec",
    "TrainState",
    "batch_sharding",
    "build_spec",
    "init_params",
    "init_state",
    "jit_step",
    "llama_config",
    "load_tokenizer",
    "logical_spec",
    "loss_kwargs",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "maybe_initialize_distributed",
    "place_batch",
    "replicated",
    "split_microbatches",
    "build_stage_step",
    "state_shardings",
    "weight_decay_mask",
]
