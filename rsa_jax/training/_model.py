"""The policy and reference as pure parameter pytrees: a flat {"layers/0/mlp/up": array} dict.

Flat string keys keep optimizer states and Orbax checkpoints free of integer dict keys;
`ModelDef.module` rebuilds the NNX Llama inside jit. Parameters are created directly sharded:
eval_shape for the abstract tree, then a jitted init (or the safetensors loader) with the target
shardings.

With `model.lora` (rank >= 1) the trainable parameters are the LoRA adapters only
(`rsa_jax.models.split_lora`); the base is frozen, stored as `model.lora.base_storage`, created
or loaded once (`init_lora`) and passed to the step as its second, non-donated argument, the
"frozen inputs":

    full fine-tuning: frozen = the reference's parameters (a second full model)
    LoRA:             frozen = {"base": base, "adapters": None (stage 1: the reference is the
                                base with adapters off) | the reference's adapters (stage 2)}

`ModelDef.policy(params, frozen)` and `ModelDef.reference(frozen)` build the two models from
them, so the objectives are the same code for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rsa_jax.config import ModelConfig
from rsa_jax.data import train_bpe_tokenizer
from rsa_jax.models import (
    Llama,
    LlamaConfig,
    LoraConfig,
    LoraSpec,
    check_tokenizer_dir,
    load_hf,
    nest_params,
    split_lora,
    tiny_config,
    to_lora,
)
from rsa_jax.training._mesh import Layout


def _key(path) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass
class ModelDef:
    """Everything needed to rebuild the model from a flat parameter dict: the architecture, the
    NNX graph, each parameter's logical axes and sharding."""

    llama: LlamaConfig
    graphdef: nnx.GraphDef
    abstract: nnx.State  # nested state of ShapeDtypeStructs, rebuilt per call
    axes: dict[str, tuple]  # flat key -> logical axes
    shardings: dict[str, NamedSharding]
    # What determines the traced program: equal keys give interchangeable models (step cache).
    key: tuple = ()
    # `make(seed)` builds the NNX model with fresh random weights (used by `init_params`).
    make: Callable[..., Llama] | None = None
    # LoRA (None: full fine-tuning). Then `axes`/`shardings` are the adapters' (the trainable
    # parameters), `base_abstract`/`base_shardings` the frozen base's (a quantized weight is a
    # qwix.QArray of ShapeDtypeStructs / of shardings), and `full` the plain model definition
    # the base is loaded with and that merged (exported) parameters are built on.
    lora: LoraSpec | None = None
    adapters_abstract: dict | None = None
    base_abstract: dict | None = None
    base_shardings: dict | None = None
    full: ModelDef | None = None

    def policy(self, params: dict, frozen, *, dropout_key=None) -> Llama:
        """The trained model: `params` (full model, or adapters on the frozen base).
        `dropout_key` turns on LoRA adapter dropout (training steps only; full fine-tuning has
        no dropout and never gets a key)."""
        if self.lora is None:
            return self.module(params)
        return self.lora.module(frozen["base"], params, dropout_key=dropout_key)

    def reference(self, frozen) -> Llama:
        """The frozen reference model, no gradient: `frozen` itself (full fine-tuning), or the
        base with the reference adapters (None: adapters off)."""
        if self.lora is None:
            return self.module(jax.lax.stop_gradient(frozen))
        adapters = frozen["adapters"]
        if adapters is not None:
            adapters = jax.lax.stop_gradient(adapters)
        return self.lora.module(frozen["base"], adapters)

    def frozen_shardings(self, with_adapters: bool):
        """Shardings of the step's frozen argument (see the module docstring)."""
        if self.lora is None:
            return self.shardings
        return {"base": self.base_shardings, "adapters": self.shardings if with_adapters else None}

    def module(self, params: dict[str, jax.Array] | dict[str, jax.ShapeDtypeStruct]) -> Llama:
        """The plain NNX Llama over full parameters (with LoRA: merged ones, see `merge`), or
        over their ShapeDtypeStructs (an abstract model: `rsa-jax compile`)."""
        if self.full is not None:
            return self.full.module(params)
        return nnx.merge(self.graphdef, nest_params(params))

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The trainable parameters' shapes, dtypes and shardings (with LoRA: the adapters)."""
        if self.adapters_abstract is not None:
            return self.adapters_abstract
        return {
            _key(p): jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.shardings[_key(p)])
            for p, v in nnx.to_flat_state(self.abstract)
        }


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def activation_constraint(layout: Layout) -> Callable | None:
    """`constrain(x, logical_axes) -> x` for the model's [B, L, D] layer boundaries: rows over
    the batch rule's mesh axes, tokens over the length rule's, features whole (None on one
    device, or when a dimension does not divide). Why: FSDP shards the weights' `embed` axis;
    left unconstrained, XLA's sharding propagation may carry that layout onto the activations
    and contract over the sharded axis, all-reducing every [B, L, D] activation and its
    gradient over fsdp instead of all-gathering each layer's weights once (a compiled
    Llama-3-8B step on a v5p-8 moved 700 GiB per chip per step that way)."""
    if layout.mesh.size == 1:
        return None
    mesh = layout.mesh
    rows, tokens = (tuple(a) if isinstance(a, tuple) else (a,) for a in layout.batch.spec)
    rows = tuple(a for a in rows if a is not None)
    tokens = tuple(a for a in tokens if a is not None)

    def shards(axes) -> int:
        return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    def constrain(x, logical_axes):
        del logical_axes  # always (batch, length, embed)
        if x.shape[0] % shards(rows) or x.shape[1] % shards(tokens):
            return x
        spec = PartitionSpec(rows or None, tokens or None, None)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain


def define_model(config: ModelConfig, llama: LlamaConfig, layout: Layout) -> ModelDef:
    constrain = activation_constraint(layout)

    def make(seed: int = config.init_seed):
        return Llama(
            llama,
            rngs=nnx.Rngs(seed),
            param_dtype=jnp.float32,  # fp32 master weights
            compute_dtype=_dtype(config.compute_dtype),
            remat=config.remat,
            scan_layers=config.scan_layers,
            constrain=constrain,
        )

    abstract_model = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract_model)
    axes, shardings = {}, {}
    for path, var in nnx.to_flat_state(state):
        logical = var.get_metadata().get("logical_axes")
        axes[_key(path)] = logical
        shardings[_key(path)] = layout.sharding(logical, var.shape)
    key = (llama, config.compute_dtype, config.remat, config.scan_layers, layout)
    full = ModelDef(llama, graphdef, state, axes, shardings, key, make)
    if not config.uses_lora:
        return full
    return _define_lora(full, lora_config(config), layout)


def lora_config(config: ModelConfig) -> LoraConfig:
    s = config.lora
    assert s is not None and s.rank > 0
    return LoraConfig(
        rank=s.rank,
        alpha=float(s.alpha),
        targets=tuple(s.targets),
        base_storage=s.base_storage,
        block_size=s.block_size,
        dropout=float(s.dropout),
    )


def _adapter_rngs(seed: int) -> nnx.Rngs:
    # A stream of its own: A's draws must not repeat the tiny base's (same seed) draws.
    return nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 0x10A))


def _define_lora(full: ModelDef, lora: LoraConfig, layout: Layout) -> ModelDef:
    """The LoRA model definition over `full`'s architecture, from shapes only (eval_shape)."""
    make = full.make
    assert make is not None

    def convert(model: Llama, seed: int) -> Llama:
        return to_lora(model, lora, rngs=_adapter_rngs(seed))

    abstract_model = nnx.eval_shape(lambda: convert(make(), 0))
    spec, base_abs, adapters_abs = split_lora(abstract_model)
    base_sh = spec.shardings(base_abs, layout.sharding)
    adapter_sh = spec.shardings(adapters_abs, layout.sharding)

    def with_sharding(tree, shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )

    return dataclasses.replace(
        full,
        axes=spec.adapter_axes,
        shardings=adapter_sh,
        key=(full.key, lora),
        make=lambda seed=0: convert(make(seed), seed),
        lora=spec,
        adapters_abstract=with_sharding(adapters_abs, adapter_sh),
        base_abstract=with_sharding(base_abs, base_sh),
        base_shardings=base_sh,
        full=full,
    )


# Jitted random inits by (model.key, seed): runs in one process (sweep variants, tests) compile
# the init once instead of once per run.
_INIT_CACHE: dict = {}


def init_params(model: ModelDef, config: ModelConfig) -> dict[str, jax.Array]:
    """Random init (path "tiny") or the safetensors weights, placed straight on their shardings."""
    if config.path == "tiny":
        cache_key = (model.key, config.init_seed)
        init = _INIT_CACHE.get(cache_key)
        if init is None:
            make, seed = model.make, config.init_seed
            assert make is not None, "a ModelDef built by define_model"

            def fresh():
                state = nnx.state(make(seed))
                return {_key(p): v[...] for p, v in nnx.to_flat_state(state)}

            init = _INIT_CACHE[cache_key] = jax.jit(fresh, out_shardings=model.shardings)
        return init()
    loaded = load_hf(
        config.path,
        param_dtype=jnp.float32,
        compute_dtype=_dtype(config.compute_dtype),
        remat=config.remat,
        scan_layers=config.scan_layers,
        shardings=lambda path, axes: model.shardings[_key(path)],
    )
    return {_key(p): v[...] for p, v in nnx.to_flat_state(nnx.state(loaded))}


def init_lora(model: ModelDef, config: ModelConfig) -> tuple[dict, dict]:
    """(frozen base, initial adapters) of a LoRA model, placed on their shardings: a random tiny
    base, or the safetensors weights loaded (float32, sharded) and converted once to the base
    storage. Adapters: A uniform, B = 0, so the initial LoRA model equals the base."""
    assert model.lora is not None and model.full is not None and model.make is not None
    out_sh = (model.base_shardings, model.shardings)
    if config.path == "tiny":
        cache_key = (model.key, config.init_seed)
        init = _INIT_CACHE.get(cache_key)
        if init is None:
            make, seed = model.make, config.init_seed

            def fresh():
                return split_lora(make(seed))[1:]

            init = _INIT_CACHE[cache_key] = jax.jit(fresh, out_shardings=out_sh)
        return init()
    full_shardings = model.full.shardings
    loaded = load_hf(
        config.path,
        param_dtype=jnp.float32,
        compute_dtype=_dtype(config.compute_dtype),
        remat=config.remat,
        scan_layers=config.scan_layers,
        shardings=lambda path, axes: full_shardings[_key(path)],
    )
    converted = to_lora(loaded, model.lora.lora, rngs=_adapter_rngs(config.init_seed))
    _, base, adapters = split_lora(converted)
    return jax.device_put((base, adapters), out_sh)


def llama_config(config: ModelConfig, vocab_size: int | None = None) -> LlamaConfig:
    if config.path == "tiny":
        llama = tiny_config(vocab_size=vocab_size or 256)
    else:
        llama = LlamaConfig.from_dir(config.path)
    return dataclasses.replace(llama, attention=config.attention)


def load_tokenizer(config: ModelConfig):
    if config.path == "tiny":
        return train_bpe_tokenizer()
    from transformers import AutoTokenizer

    check_tokenizer_dir(config.path)  # else a missing path reads as a malformed hub repo id
    return AutoTokenizer.from_pretrained(config.path, local_files_only=True)
