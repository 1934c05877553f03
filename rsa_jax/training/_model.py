"""The policy and reference as pure parameter pytrees: a flat {"layers/0/mlp/up": array} dict.

Flat string keys keep optimizer states and Orbax checkpoints free of integer dict keys;
`ModelDef.module` rebuilds the NNX Llama inside jit. Parameters are created directly sharded:
eval_shape for the abstract tree, then a jitted init (or the safetensors loader) with the target
shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from rsa_jax.config import ModelConfig
from rsa_jax.data import train_bpe_tokenizer
from rsa_jax.models import Llama, LlamaConfig, check_tokenizer_dir, load_hf, tiny_config
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

    def module(self, params: dict[str, jax.Array]) -> Llama:
        nested: dict = {}
        for key, value in params.items():
            node = nested
            parts = [int(p) if p.isdigit() else p for p in key.split("/")]
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return nnx.merge(self.graphdef, nested)

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            _key(p): jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.shardings[_key(p)])
            for p, v in nnx.to_flat_state(self.abstract)
        }


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def define_model(config: ModelConfig, llama: LlamaConfig, layout: Layout) -> ModelDef:
    def make(seed: int = config.init_seed):
        return Llama(
            llama,
            rngs=nnx.Rngs(seed),
            param_dtype=jnp.float32,  # fp32 master weights
            compute_dtype=_dtype(config.compute_dtype),
            remat=config.remat,
            scan_layers=config.scan_layers,
        )

    abstract_model = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract_model)
    axes, shardings = {}, {}
    for path, var in nnx.to_flat_state(state):
        logical = var.get_metadata().get("logical_axes")
        axes[_key(path)] = logical
        shardings[_key(path)] = layout.sharding(logical, var.shape)
    key = (llama, config.compute_dtype, config.remat, config.scan_layers, layout)
    return ModelDef(llama, graphdef, state, axes, shardings, key, make)


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
