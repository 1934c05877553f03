"""LoRA and QLoRA on the NNX Llama: a frozen base and trainable low-rank adapters, as two flat
parameter dicts.

Dimension legend: L layers (scanned models only), D model width, H query heads, K key/value
heads, E head dim, F MLP width, r LoRA rank.

For every targeted projection y = x W, with W [*in, *out] (q: [D, H, E], o: [H, E, D], ...):

    y = x W + (alpha / r) (x A) B,    A [*in, r] ~ U(-1/sqrt(in), 1/sqrt(in)),  B [r, *out] = 0,

so at initialisation the LoRA model equals the base exactly (A as PEFT initialises it). The
base is stored as `LoraConfig.base_storage`: float32, bfloat16, or block-quantized int8 / nf4
(QLoRA: nf4 base + float32 adapters; see `_quant.py`), and quantized weights are dequantized
inside the projection that uses them (`_project.py`).

Flat keys follow the trainer's (`"/".join(path)`): base `layers/0/attention/q` (a `qwix.QArray`
when quantized), adapters `layers/0/attention/q_lora_a` and `..._lora_b`; with
`scan_layers=True`, `blocks/attention/q_lora_a` with a leading L axis. Adapter logical axes are
(*the input's axes, None) for A and (None, *the output's axes) for B (plus a leading `layers`),
so one rules table shards adapters like the base.

    lora = LoraConfig(rank=8, alpha=16, base_storage="nf4")
    model = to_lora(load_hf(path), lora, rngs=nnx.Rngs(0))
    spec, base, adapters = split_lora(model)
    hidden = spec.module(base, adapters)(input_ids, positions, attention_mask)   # policy
    ref_hidden = spec.module(base)(input_ids, positions, attention_mask)         # adapters off
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from rsa_jax.models import _export
from rsa_jax.models._config import LlamaConfig
from rsa_jax.models._llama import Llama
from rsa_jax.models._project import INPUT_DIMS, PROJECTIONS, dense_weight
from rsa_jax.models._quant import STORAGES, non_projection_dtype, store_weight
from rsa_jax.models._weights import hf_name, load_hf, save_hf

LORA_A, LORA_B = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8  # r
    alpha: float = 16.0  # the delta is scaled by alpha / rank
    # Projections that get adapters, among q, k, v, o, gate, up, down.
    targets: tuple[str, ...] = PROJECTIONS
    # Storage of the frozen base: float32 | bfloat16 | int8 | nf4 (QLoRA). With int8/nf4 the
    # seven projections are quantized, embeddings/norms/biases are kept in bfloat16.
    base_storage: str = "bfloat16"
    block_size: int = 64  # quantization block (entries per scale) along a weight's input axis
    # Dropout on each adapter's input (PEFT's lora_dropout), active only when `LoraSpec.module`
    # gets a `dropout_key` (training); 0 disables it.
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"lora.targets must be distinct names among {', '.join(PROJECTIONS)}, "
                f"got {list(self.targets)}"
            )
        object.__setattr__(self, "targets", targets)
        if self.base_storage not in STORAGES:
            raise ValueError(
                f"lora.base_storage must be one of {', '.join(STORAGES)}, got {self.base_storage!r}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"lora.block_size must be a positive integer, got {self.block_size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _projection_modules(model: Llama):
    """(module, its projection names) for every Attention and MLP of the model."""
    blocks = [model.blocks] if model.scan_layers else list(model.layers)
    for block in blocks:
        yield block.attention, ("q", "k", "v", "o")
        yield block.mlp, ("gate", "up", "down")


def to_lora(model: Llama, lora: LoraConfig, *, rngs: nnx.Rngs) -> Llama:
    """Turns `model` into its LoRA model, in place (no second copy of the weights), and returns it.

    The base is converted to `lora.base_storage`; every targeted projection gets adapters
    `<name>_lora_a` (uniform, as PEFT) and `<name>_lora_b` (zeros) as `nnx.LoRAParam`s in
    float32, and its module the static `lora_scale = alpha / rank`.
    """
    stacked = model.scan_layers
    lead_shape = (model.config.num_hidden_layers,) if stacked else ()
    lead_axes = ("layers",) if stacked else ()
    projections = set()
    for module, names in _projection_modules(model):
        module.lora_scale = lora.scale  # pyright: ignore[reportAttributeAccessIssue]
        module.lora_dropout = lora.dropout  # pyright: ignore[reportAttributeAccessIssue]
        for name in names:
            var = getattr(module, name)
            projections.add(id(var))
            shape, axes = tuple(var.shape), var.get_metadata()["logical_axes"]
            k, n_in = len(lead_shape), INPUT_DIMS[name]
            if name in lora.targets:
                in_shape, out_shape = shape[k : k + n_in], shape[k + n_in :]
                bound = 1.0 / math.sqrt(math.prod(in_shape))
                a = jax.random.uniform(
                    rngs.params(), (*lead_shape, *in_shape, lora.rank), jnp.float32, -bound, bound
                )
                b = jnp.zeros((*lead_shape, lora.rank, *out_shape), jnp.float32)
                a_axes = (*lead_axes, *axes[k : k + n_in], None)
                b_axes = (*lead_axes, None, *axes[k + n_in :])
                setattr(module, name + LORA_A, nnx.LoRAParam(a, logical_axes=a_axes))
                setattr(module, name + LORA_B, nnx.LoRAParam(b, logical_axes=b_axes))
            var.set_value(
                store_weight(
                    var.get_value(),
                    lora.base_storage,
                    input_dims=n_in,
                    block_size=lora.block_size,
                    stacked=stacked,
                )
            )
    other = non_projection_dtype(lora.base_storage)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and not isinstance(node, nnx.LoRAParam):
            if id(node) not in projections:
                node.set_value(node.get_value().astype(other))
    model.lora = lora  # pyright: ignore[reportAttributeAccessIssue]
    return model


def _key(path) -> str:
    return "/".join(str(p) for p in path)


def _flat(state) -> tuple[dict, dict]:
    """(values, logical axes) of a state, keyed `a/b/0/c`."""
    values, axes = {}, {}
    for path, var in nnx.to_flat_state(state):
        values[_key(path)] = var.get_value()
        axes[_key(path)] = var.get_metadata().get("logical_axes")
    return values, axes


def nest_params(flat: dict) -> dict:
    """{"layers/0/mlp/up": x} -> {"layers": {0: {"mlp": {"up": x}}}}: the nested state that
    `nnx.merge` takes, from the flat string-keyed dicts that optimizers and checkpoints hold."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


@dataclasses.dataclass
class LoraSpec:
    """Rebuilds the LoRA model (or its base alone) from flat (base, adapters) dicts, in jit."""

    llama: LlamaConfig
    lora: LoraConfig
    graphdef: nnx.GraphDef  # base + adapters
    base_graphdef: nnx.GraphDef  # the same modules without adapters: the "adapters off" model
    base_axes: dict[str, tuple]  # flat key -> logical axes (a QArray's codes and scales share them)
    adapter_axes: dict[str, tuple]

    def module(self, base: dict, adapters: dict | None = None, *, dropout_key=None) -> Llama:
        """The Llama over `base` (+ `adapters`; None: adapters off, i.e. the reference model on
        the same base arrays, no copy). The base is frozen: no gradient flows into it.

        `dropout_key` (a PRNG key; training only) turns on the adapters' input dropout when
        `lora.dropout > 0`: each module gets its own key (one per layer when scanned) and each
        projection folds in its index, so every adapter draws an independent mask.
        """
        base = jax.tree.map(jax.lax.stop_gradient, base)
        if adapters is None:
            return nnx.merge(self.base_graphdef, nest_params(base))
        model = nnx.merge(self.graphdef, nest_params(base), nest_params(adapters))
        if dropout_key is not None and self.lora.dropout > 0:
            layers = (self.llama.num_hidden_layers,) if model.scan_layers else ()
            for i, (module, _) in enumerate(_projection_modules(model)):
                keys = jax.random.fold_in(dropout_key, i)
                if layers:  # scanned: one key per layer, sliced by the layer scan
                    keys = jax.random.split(keys, layers[0])
                module.lora_key = nnx.Variable(keys)  # pyright: ignore[reportAttributeAccessIssue]
        return model

    def shardings(self, tree: dict, sharding: Callable) -> dict:
        """`sharding(logical_axes, shape) -> Sharding` for every array of a flat base or adapter
        dict (for a QArray: its codes and its scales), in the same structure (for jit and
        device_put)."""
        axes = {**self.base_axes, **self.adapter_axes}
        return {
            k: jax.tree.map(lambda leaf, a=axes[k]: sharding(a, leaf.shape), v)
            for k, v in tree.items()
        }


def split_lora(model: Llama) -> tuple[LoraSpec, dict, dict]:
    """(spec, frozen base, trainable adapters) of a model made by `to_lora`; flat dicts."""
    lora = getattr(model, "lora", None)
    if not isinstance(lora, LoraConfig):
        raise ValueError("split_lora needs a model converted by to_lora")
    graphdef, adapter_state, base_state = nnx.split(model, nnx.LoRAParam, ...)
    # The adapters-off graph: the same modules with the adapter attributes detached for a moment.
    detached = []
    for module, names in _projection_modules(model):
        attrs = [n + s for n in names for s in (LORA_A, LORA_B)] + ["lora_scale", "lora_dropout"]
        for attr in attrs:
            if attr in vars(module):
                detached.append((module, attr, getattr(module, attr)))
                delattr(module, attr)
    try:
        base_graphdef, _ = nnx.split(model)
    finally:
        for module, attr, value in detached:
            setattr(module, attr, value)
    base, base_axes = _flat(base_state)
    adapters, adapter_axes = _flat(adapter_state)
    spec = LoraSpec(model.config, lora, graphdef, base_graphdef, base_axes, adapter_axes)
    return spec, base, adapters


def param_count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def merged_params(spec: LoraSpec, base: dict, adapters: dict) -> dict[str, np.ndarray]:
    """The base dequantized to float32 plus `(alpha / r) A B` on every adapted weight: flat
    float32 arrays for the adapters-off graph (`spec.base_graphdef`)."""
    merged = {}
    for key, value in base.items():
        w = np.asarray(dense_weight(value, jnp.float32))
        a_key, b_key = key + LORA_A, key + LORA_B
        if a_key in adapters:
            a, b = np.asarray(adapters[a_key], np.float32), np.asarray(adapters[b_key], np.float32)
            if key.startswith("blocks/"):  # scanned: [L, ...], one product per layer
                delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
            else:
                delta = np.tensordot(a, b, axes=1)  # [*in, r] . [r, *out] -> [*in, *out]
            w = w + np.float32(spec.lora.scale) * delta
        merged[key] = w
    return merged


def save_merged_hf(
    spec: LoraSpec, base: dict, adapters: dict, path: str, *, dtype="float32", tokenizer=None
) -> None:
    """A Hugging Face directory of the merged model (`load_hf` / transformers read it)."""
    merged = merged_params(spec, base, adapters)
    model = nnx.merge(
        spec.base_graphdef, nest_params({k: jnp.asarray(v) for k, v in merged.items()})
    )
    save_hf(model, path, tokenizer, dtype=dtype)


def merge_into_base(
    spec: LoraSpec,
    adapters: dict,
    base_dir: str,
    path: str,
    *,
    scan_layers: bool = False,
    dtype: str = "float32",
    tokenizer=None,
) -> None:
    """PEFT's `merge_and_unload` habit: the adapters added to the float base in `base_dir`
    (a Hugging Face directory), written as a Hugging Face directory at `path`.

    With a quantized training base (int8, nf4) this is NOT the model that was trained: that
    one is the dequantized base plus the adapters (`save_merged_hf`); the adapters learnt to
    correct the quantized weights, so on the float base they give another model. The two are
    offered under their own names so an export says which it is.
    """
    want = spec.llama
    got = LlamaConfig.from_dir(base_dir)
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    differ = [
        f"{k} {getattr(got, k)} != {getattr(want, k)}"
        for k in shape
        if getattr(got, k) != getattr(want, k)
    ]
    if differ:
        raise ValueError(
            f"{base_dir}: not the base these adapters were trained on ({'; '.join(differ)})"
        )
    model = load_hf(base_dir, scan_layers=scan_layers)
    lora = dataclasses.replace(spec.lora, base_storage="float32", dropout=0.0)
    float_spec, base, fresh = split_lora(to_lora(model, lora, rngs=nnx.Rngs(0)))
    if set(fresh) != set(adapters):
        raise ValueError(f"{base_dir}: the adapters do not fit this base's projections")
    save_merged_hf(float_spec, base, adapters, path, dtype=dtype, tokenizer=tokenizer)


_PEFT_MODULE = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


def peft_tensors(spec: LoraSpec, adapters: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names and torch Linear layouts: `lora_A.weight` [r, in] and
    `lora_B.weight` [out, r] (in/out flattened in Hugging Face's order, e.g. q's out = H*E)."""
    tensors = {}
    r = spec.lora.rank
    for key, a in adapters.items():
        if not key.endswith(LORA_A):
            continue
        weight_key = key[: -len(LORA_A)]
        path = tuple(int(p) if p.isdigit() else p for p in weight_key.split("/"))
        name, _, _ = hf_name(path, spec.llama)  # e.g. model.layers.0.self_attn.q_proj.weight
        module_name = name[: -len(".weight")]
        a = np.asarray(a, np.float32)
        b = np.asarray(adapters[weight_key + LORA_B], np.float32)
        stacked = path[0] == "blocks"
        layers = range(a.shape[0]) if stacked else [None]
        for i in layers:
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            prefix = "base_model.model." + module_name.format(i=i)
            tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(
                ai.reshape(-1, r).T.astype(dtype)
            )
            tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(
                bi.reshape(r, -1).T.astype(dtype)
            )
    return tensors


BASE_RECORD = "rsa_jax_base.json"


def save_peft(
    spec: LoraSpec, adapters: dict, path: str, *, base_model_name_or_path: str | None = None
) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` in PEFT's layout (float32), which
    `peft.PeftModel.from_pretrained(base, path)` loads onto the Hugging Face base model, and
    `rsa_jax_base.json`: the base they were trained on and its storage (a quantized base is
    not the float one PEFT users apply adapters to; see `merge_into_base`)."""
    os.makedirs(path, exist_ok=True)
    tensors = peft_tensors(spec, adapters)
    _export.check_finite(tensors, path)
    weights = os.path.join(path, "adapter_model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.lora.rank,
        "lora_alpha": spec.lora.alpha,
        "lora_dropout": spec.lora.dropout,
        "target_modules": sorted(_PEFT_MODULE[t] for t in spec.lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _export.publish(weights)  # safetensors creates its file readable by the owner only
    quantized = spec.lora.base_storage in ("int8", "nf4")
    record = {
        "base_model_name_or_path": base_model_name_or_path,
        "base_storage": spec.lora.base_storage,
        "block_size": spec.lora.block_size if quantized else None,
        "note": (
            f"trained on the {spec.lora.base_storage}-quantized base: on the float base these "
            "adapters give another model than the one trained (rsa-jax export RUN OUT writes "
            "the trained one)"
            if quantized
            else "trained on this base in " + spec.lora.base_storage
        ),
    }
    with open(os.path.join(path, BASE_RECORD), "w") as f:
        json.dump(record, f, indent=2)
