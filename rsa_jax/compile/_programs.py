"""The jitted programs `train`, `sweep` and `eval` run, built from shapes only.

Each program is the engine's own: `Engine.compiled_step` (a stage's train step),
`Engine.vmapped_step` (a vmap sweep's K stacked variants, placed by `rsa_jax.sweep`) or the
evaluation sampler (`rsa_jax.eval.sampling_call`: `rsa_jax.generate`'s jitted sampler on the
final policy as `rsa-jax eval RUN` loads it), with
`jax.ShapeDtypeStruct` arguments carrying the `NamedSharding`s that the real run's arrays have.
The engine itself is built from the architecture alone (`Engine(..., llama=, tokenizer=)`):
nothing here reads or allocates a weight; `Program.lower()` traces and lowers, and the caller
compiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rsa_jax.compile._report import SamplerShape, StepShape, shard_bytes
from rsa_jax.config import Config, StageConfig
from rsa_jax.models import LlamaConfig, cast_at_use
from rsa_jax.training import (
    BATCH_KEYS,
    Engine,
    Hyper,
    Layout,
    TrainState,
    make_mesh,
    opt_state_shardings,
    stage_dropout_key,
)

# Dtypes of a placed batch (rsa_jax.data's layout): ids, positions and labels int32, masks bool.
_BATCH_DTYPES = {
    "input_ids": jnp.int32,
    "positions": jnp.int32,
    "attention_mask": jnp.bool_,
    "labels": jnp.int32,
    "loss_mask": jnp.bool_,
}


@dataclasses.dataclass
class Program:
    """One jitted program and its abstract arguments."""

    name: str
    fn: Callable  # the jitted function the run calls
    args: tuple  # ShapeDtypeStructs with shardings
    roles: dict[str, int]  # per-device argument bytes by role
    shape: StepShape | SamplerShape  # for the analytic FLOP count
    mesh: Mesh
    llama: LlamaConfig  # the engine's architecture (a tiny model's vocabulary included)
    static: dict = dataclasses.field(default_factory=dict)  # static keyword arguments of `fn`
    # per-device bytes of named arrays the program creates itself (part of its temporaries)
    created: dict[str, int] = dataclasses.field(default_factory=dict)

    def lower(self):
        return self.fn.lower(*self.args, **self.static)


class _NoTokenizer:
    """Stands in for the tokenizer of a preset or config-only directory: compiling reads no data."""

    def __len__(self) -> int:  # pragma: no cover - only reached with llama=None
        raise TypeError("no tokenizer: the architecture is given")


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def build_engine(config: Config, layout: Layout, llama: LlamaConfig | None) -> Engine:
    """The run's engine on `layout` (the topology's devices); `llama` None: `model.path` tiny."""
    if llama is None:
        return Engine(config, layout=layout)
    return Engine(config, layout=layout, llama=llama, tokenizer=_NoTokenizer())


def abstract_state(engine: Engine) -> TrainState:
    """The TrainState a stage starts from, as `Engine.new_state` places it: parameters on their
    shardings, each Adam moment on its parameter's, scalars replicated."""
    params = engine.model.abstract_params()
    rep = engine.layout.replicated
    opt = _abstract(
        jax.eval_shape(engine.tx.init, params), opt_state_shardings(engine.tx, params, rep)
    )
    return TrainState(params, opt, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))


def abstract_reference(engine: Engine, follows_previous: bool):
    """The step's frozen argument: the reference (full fine-tuning) or {"base", "adapters"}."""
    model = engine.model
    if model.lora is None:
        return model.abstract_params()
    return {
        "base": model.base_abstract,
        "adapters": model.abstract_params() if follows_previous else None,
    }


def abstract_batch(config: Config, sharding) -> dict:
    rows = 2 * config.data.batch_size
    length = config.data.max_prompt_len + config.data.max_response_len
    return {
        k: jax.ShapeDtypeStruct((rows, length), _BATCH_DTYPES[k], sharding=sharding)
        for k in BATCH_KEYS
    }


def abstract_hyper(config: Config, index: int, sharding):
    stage = config.stages[index]
    total = max(stage.steps, 1)
    hyper = jax.eval_shape(
        lambda: Hyper.for_stage(stage, config.optim, total, stage_dropout_key(config, index))
    )
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), hyper)


def step_shape(engine: Engine, stage: StageConfig, variants: int = 1) -> StepShape:
    config = engine.config
    lora = config.model.lora if config.model.uses_lora else None
    return StepShape(
        rows=2 * config.data.batch_size,
        length=config.data.max_prompt_len + config.data.max_response_len,
        remat=bool(config.model.remat),
        lora_rank=lora.rank if lora is not None else 0,
        lora_targets=tuple(lora.targets) if lora is not None else (),
        reference=True,
        reference_adapters=lora is not None and stage.follows_previous,
        head=config.train.head,
        chunk_size=config.train.chunk_size if config.train.head == "fused" else 0,
        variants=variants,
    )


def _roles(state, reference, batch, hyper, model_is_lora: bool) -> dict[str, int]:
    return {
        "parameters": shard_bytes(state.params),
        "optimizer state": shard_bytes((state.opt_state, state.step)),
        ("frozen base + reference" if model_is_lora else "reference"): shard_bytes(reference),
        "batch + hyperparameters": shard_bytes((batch, hyper)),
    }


def _stage_groups(config: Config) -> list[tuple[str, list[int]]]:
    """Stages that run one compiled program (same kernel and, with LoRA, reference kind)."""
    groups: dict[tuple, list[int]] = {}
    lora = config.model.uses_lora  # full fine-tuning: the reference's kind shapes nothing
    for i, s in enumerate(config.stages):
        groups.setdefault((s.kernel, lora and s.follows_previous), []).append(i)
    out = []
    for indices in groups.values():
        names = ", ".join(f"{i} ({config.stages[i].name})" for i in indices)
        out.append((f"train step of stage{'s' if len(indices) > 1 else ''} {names}", indices))
    return out


def train_programs(config: Config, devices: list, llama: LlamaConfig | None) -> list[Program]:
    """Each distinct stage step of `train(config)` on `devices` with the config's mesh."""
    layout = Layout(make_mesh(config.mesh, devices), config.mesh.rules)
    engine = build_engine(config, layout, llama)
    programs = []
    for name, indices in _stage_groups(config):
        i = indices[0]
        stage = config.stages[i]
        state = abstract_state(engine)
        reference = abstract_reference(engine, stage.follows_previous)
        batch = abstract_batch(config, layout.batch)
        hyper = abstract_hyper(config, i, layout.replicated)
        fn = engine.compiled_step(
            engine.objective(stage),
            jax.tree.map(lambda x: x.sharding, state),
            reference_adapters=stage.follows_previous,
        )
        programs.append(
            Program(
                name,
                fn,
                (state, reference, batch, hyper),
                _roles(state, reference, batch, hyper, engine.model.lora is not None),
                step_shape(engine, stage),
                layout.mesh,
                engine.model.llama,
            )
        )
    return programs


def sweep_programs(
    config: Config, devices: list, llama: LlamaConfig | None, k: int, variant_devices: int | None
) -> list[Program]:
    """The vmap sweep's step of each stage kind for K variants of `config` (every stage vmapped:
    the most a sweep holds; stages all variants share run `train_programs`' step instead),
    placed on `variant_devices` groups as `rsa-jax sweep` places them."""
    from rsa_jax.sweep import VARIANT_AXIS, variant_placement

    placement = variant_placement(config, k, variant_devices, where="--sweep", devices=devices)
    engine = build_engine(config, placement.layout, llama)
    rep = engine.layout.replicated

    def stacked(tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                (k, *x.shape), x.dtype, sharding=placement.stacked(x.sharding)
            ),
            tree,
        )

    programs = []
    for name, indices in _stage_groups(config):
        i = indices[0]
        stage = config.stages[i]
        one = abstract_state(engine)
        state = TrainState(
            stacked(one.params),
            stacked(one.opt_state),
            jax.ShapeDtypeStruct((k,), jnp.int32, sharding=placement.variant),
        )
        ref_axis = 0 if stage.follows_previous else None
        if engine.model.lora is None:
            reference = stacked(one.params) if ref_axis == 0 else abstract_reference(engine, False)
        else:
            adapters = stacked(one.params) if ref_axis == 0 else None
            reference = {"base": engine.model.base_abstract, "adapters": adapters}
        batch = abstract_batch(config, engine.layout.batch)
        hyper = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=placement.variant),
            abstract_hyper(config, i, rep),
        )
        fn = engine.vmapped_step(
            engine.objective(stage),
            ref_axis,
            shardings=placement.step_shardings(engine, state, reference),
            axis_name=VARIANT_AXIS,
        )
        programs.append(
            Program(
                f"vmap sweep step (K={k}) of {name.removeprefix('train step of ')}",
                fn,
                (state, reference, batch, hyper),
                _roles(state, reference, batch, hyper, engine.model.lora is not None),
                step_shape(engine, stage, variants=k),
                placement.mesh,
                engine.model.llama,
            )
        )
    return programs


SAMPLER = "eval sampler"  # the sampler program's name starts with it


def sampler_program(
    config: Config,
    devices: list,
    llama: LlamaConfig | None,
    *,
    hbm_bytes: int,
    eval_rows: int,
    max_new_tokens: int,
) -> Program:
    """The sampling batch `rsa-jax eval RUN` runs on the run's final policy, on `devices` with
    the config's mesh: the merged policy (`load_policy`: float32 parameters on the training
    shardings, computing in `model.compute_dtype`; `load_model` stores the weights cast at
    every use in that dtype), prompts of `PROMPT_SLOTS` slots (the widest
    batch), `max_new_tokens` new tokens, and as many of `eval_rows` rows per batch as
    `rsa_jax.eval`'s memory budget gives on a chip of `hbm_bytes` holding the parameters (half
    of what they leave free, as `default_memory_budget` reads it on a TPU)."""
    from rsa_jax.eval import DEVICE_FRACTION, PROMPT_SLOTS, placement_for, sampling_call
    from rsa_jax.eval import sampling_rows as batch_rows

    mesh_placement = placement_for(config.mesh, devices)
    layout = Layout(mesh_placement.mesh, dict(mesh_placement.rules))
    engine = build_engine(config, layout, llama)
    arch = engine.model.llama
    # Stored as `load_model` stores them for evaluation (`store_in_compute_dtype`).
    compute = jnp.dtype(config.model.compute_dtype)
    params = {
        k: jax.ShapeDtypeStruct(s.shape, compute, sharding=s.sharding)
        if cast_at_use(k, arch) and s.dtype.itemsize > compute.itemsize
        else s
        for k, s in engine.merged_abstract().items()
    }
    model = engine.model.module(params)
    # One device: evaluation samples without shardings (`placement_of` is None there).
    placement = mesh_placement if mesh_placement.mesh.size > 1 else None
    held = shard_bytes(params)
    budget = max(1, int(DEVICE_FRACTION * (hbm_bytes - held)))
    rows = batch_rows(model, placement, PROMPT_SLOTS, max_new_tokens, eval_rows, budget)
    fn, args, static = sampling_call(
        model,
        rows=rows,
        prompt_len=PROMPT_SLOTS,
        max_new_tokens=max_new_tokens,
        placement=placement,
    )
    shardings = static["shardings"]
    cache = None if shardings is None else shardings.cache
    cache_shape = (
        arch.num_hidden_layers,
        rows,
        PROMPT_SLOTS + max_new_tokens,
        arch.num_key_value_heads,
        arch.head_dim,
    )
    kv = jax.ShapeDtypeStruct(cache_shape, model.compute_dtype, sharding=cache)
    return Program(
        f"{SAMPLER} ({rows} rows x {PROMPT_SLOTS} prompt + {max_new_tokens} new tokens)",
        fn,
        args,
        {"parameters": held, "prompts + settings": shard_bytes(args[2:])},
        SamplerShape(rows, PROMPT_SLOTS, max_new_tokens),
        mesh_placement.mesh,
        arch,
        static,
        {"KV cache (keys + values)": 2 * shard_bytes(kv)},
    )


def materialised_bytes() -> int:
    """Bytes of every live jax.Array in this process (the check that compiling allocated no
    weights)."""
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.live_arrays()))
