"""Hugging Face safetensors <-> the NNX Llama, tensor by tensor.

Loading builds the model abstractly (`nnx.eval_shape`, no random init), then reads each tensor
from `model.safetensors` (or the shards listed in `model.safetensors.index.json`), converts it to
our layout and, when a mesh is given, places it directly on its target sharding, so a large model
is never held twice on the host. Export writes `config.json` + `model.safetensors` or its shards
(+ tokenizer files, `generation_config.json`; see `_export.py`) that `transformers` loads;
load(export(model)) is exact in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from rsa_jax.models import _export
from rsa_jax.models._config import LlamaConfig
from rsa_jax.models._llama import Llama

# (our path suffix) -> (HF name template, to_ours(W, config), to_hf(w, config)).
Convert = tuple[str, Callable, Callable]


def _layer_table(c: LlamaConfig) -> dict[tuple, Convert]:
    h, k, e, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    table = {
        ("attention", "q"): (
            "self_attn.q_proj.weight",
            lambda w: w.T.reshape(d, h, e),
            lambda w: w.reshape(d, h * e).T,
        ),
        ("attention", "k"): (
            "self_attn.k_proj.weight",
            lambda w: w.T.reshape(d, k, e),
            lambda w: w.reshape(d, k * e).T,
        ),
        ("attention", "v"): (
            "self_attn.v_proj.weight",
            lambda w: w.T.reshape(d, k, e),
            lambda w: w.reshape(d, k * e).T,
        ),
        ("attention", "o"): (
            "self_attn.o_proj.weight",
            lambda w: w.T.reshape(h, e, d),
            lambda w: w.reshape(h * e, d).T,
        ),
        ("attention", "q_bias"): (
            "self_attn.q_proj.bias",
            lambda w: w.reshape(h, e),
            lambda w: w.reshape(h * e),
        ),
        ("attention", "k_bias"): (
            "self_attn.k_proj.bias",
            lambda w: w.reshape(k, e),
            lambda w: w.reshape(k * e),
        ),
        ("attention", "v_bias"): (
            "self_attn.v_proj.bias",
            lambda w: w.reshape(k, e),
            lambda w: w.reshape(k * e),
        ),
        ("mlp", "gate"): ("mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
        ("mlp", "up"): ("mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
        ("mlp", "down"): ("mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
        ("input_norm", "weight"): ("input_layernorm.weight", lambda w: w, lambda w: w),
        ("post_attention_norm", "weight"): (
            "post_attention_layernorm.weight",
            lambda w: w,
            lambda w: w,
        ),
        # Qwen3 / Gemma 3: per-head q/k norms [E]; Gemma 3's norms around the MLP.
        ("attention", "q_norm", "weight"): ("self_attn.q_norm.weight", lambda w: w, lambda w: w),
        ("attention", "k_norm", "weight"): ("self_attn.k_norm.weight", lambda w: w, lambda w: w),
        ("pre_feedforward_norm", "weight"): (
            "pre_feedforward_layernorm.weight",
            lambda w: w,
            lambda w: w,
        ),
        ("post_feedforward_norm", "weight"): (
            "post_feedforward_layernorm.weight",
            lambda w: w,
            lambda w: w,
        ),
    }
    return table


def hf_name(path: tuple, config: LlamaConfig) -> tuple[str, Callable, Callable]:
    """HF tensor name and converters for one of our parameter paths."""
    if path == ("embed",):
        return "model.embed_tokens.weight", lambda w: w, lambda w: w
    if path == ("norm", "weight"):
        return "model.norm.weight", lambda w: w, lambda w: w
    if path == ("lm_head",):
        return "lm_head.weight", lambda w: w.T, lambda w: w.T
    if path[0] == "layers":
        name, to_ours, to_hf = _layer_table(config)[tuple(path[2:])]
        return f"model.layers.{path[1]}.{name}", to_ours, to_hf
    if path[0] == "blocks":  # scanned: one stacked tensor; "{i}" is filled in per layer
        name, to_ours, to_hf = _layer_table(config)[tuple(path[1:])]
        return "model.layers.{i}." + name, to_ours, to_hf
    raise KeyError(f"no Hugging Face name for parameter {path}")


class _TensorIndex:
    """Opens `model.safetensors` or the shards of `model.safetensors.index.json` lazily."""

    def __init__(self, path: str):
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                    self.files = {n: os.path.join(path, s) for n, s in weight_map.items()}
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{index}: not JSON ({e}); the export is damaged") from None
                except (KeyError, TypeError, AttributeError):
                    raise ValueError(
                        f"{index}: no weight_map of tensor name -> shard file"
                    ) from None
        elif os.path.exists(single):
            with _opened(single) as f:
                self.files = {n: single for n in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: neither model.safetensors nor its index")
        self.path = path

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise KeyError(f"{self.path}: missing tensor {name!r}")
        file = self.files[name]
        with _opened(file) as f:
            try:
                return f.get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"{file}: tensor {name!r} cannot be read ({e})") from None


@contextlib.contextmanager
def _opened(file: str):
    """`safe_open(file)`; a truncated or damaged file raises ValueError naming it (safetensors'
    own message names no file)."""
    try:
        handle = safe_open(file, framework="numpy")
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: weight file not found") from None
    except SafetensorError as e:
        raise ValueError(
            f"{file}: not a readable safetensors file ({e}); it is truncated or damaged: "
            "copy or export it again"
        ) from None
    with handle as f:
        yield f


def read_hf_tensor(path: str, name: str) -> np.ndarray:
    """One tensor of a local HF directory (`model.safetensors` or its shards) by its name, as
    stored; a KeyError naming the directory when it is missing."""
    return _TensorIndex(path).get(name)


def load_hf(
    path: str,
    *,
    param_dtype=jnp.float32,
    compute_dtype=jnp.float32,
    shardings: Callable[[tuple, tuple[str, ...] | None], jax.sharding.Sharding] | None = None,
    remat: bool | str = False,
    scan_layers: bool = False,
    constrain=None,
    attention: str | None = None,
    config: LlamaConfig | None = None,
) -> Llama:
    """Loads a local HF Llama-family directory into the NNX model.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      param_dtype, compute_dtype: parameter storage and activation dtypes.
      shardings: optional (param path, logical axes) -> Sharding; each tensor is put straight on it.
      remat, scan_layers, constrain: passed to `Llama` (scanned layers are stacked on load).
      attention: "auto", "xla" or "cudnn" (`LlamaConfig.attention`); None keeps "auto".
      config: the architecture to build instead of the directory's `config.json` (a score
        model's backbone is built tied, so no `lm_head.weight` is read: it has none).
    Returns:
      The Llama module holding the loaded weights.
    """
    config = LlamaConfig.from_dir(path) if config is None else config
    if attention is not None:
        config = dataclasses.replace(config, attention=attention)
    tensors = _TensorIndex(path)
    abstract = nnx.eval_shape(
        lambda: Llama(
            config,
            rngs=nnx.Rngs(0),
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            remat=remat,
            scan_layers=scan_layers,
            constrain=constrain,
        )
    )
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    for param_path, variable in flat:
        name, to_ours, _ = hf_name(param_path, config)
        if param_path[0] == "blocks":
            names = [name.format(i=i) for i in range(config.num_hidden_layers)]
        else:
            names = [name]
        parts = []
        for n in names:
            raw = tensors.get(n)
            part = to_ours(raw)
            want = variable.shape[1:] if param_path[0] == "blocks" else variable.shape
            if part.shape != want:
                raise ValueError(
                    f"{path}: tensor {n!r} has shape {raw.shape}, which does not fit parameter "
                    f"{'/'.join(map(str, param_path))} of shape {want}"
                )
            parts.append(part.astype(variable.dtype))
        value = np.stack(parts) if param_path[0] == "blocks" else parts[0]
        axes = variable.get_metadata().get("logical_axes")
        target = shardings(param_path, axes) if shardings is not None else None
        variable.set_value(jax.device_put(value, target))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_hf(
    model: Llama,
    path: str,
    tokenizer=None,
    *,
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
) -> None:
    """Writes a Hugging Face directory that transformers and `load_hf` read.

    Args:
      model: the Llama to export.
      path: output directory (created; weight files of an earlier export there are replaced).
      tokenizer: optional; its files are written with a portable `tokenizer_config.json`.
      dtype: "float32" or "bfloat16", the dtype of the stored weights (and config.json's
        `torch_dtype`).
      max_shard_size: bytes, or a size like "2GB"; above it the weights are sharded with a
        `model.safetensors.index.json` (default 5GB, as transformers).
    Writes config.json, generation_config.json, model.safetensors or its shards + index, and the
    tokenizer files, all readable by others.
    """
    os.makedirs(path, exist_ok=True)
    config = model.config
    tensors = {}
    for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, _, to_hf = hf_name(param_path, config)
        value = np.asarray(variable[...], np.float32)
        if param_path[0] == "blocks":
            for i in range(config.num_hidden_layers):
                tensors[name.format(i=i)] = to_hf(value[i])
        else:
            tensors[name] = to_hf(value)
    written = _export.write_weights(_export.cast(tensors, dtype), path, max_shard_size)
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = dtype
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    written.append(os.path.join(path, "config.json"))
    bos, eos, pad = config.bos_token_id, config.eos_token_id, None
    if tokenizer is not None:
        written += list(tokenizer.save_pretrained(path))
        _export.portable_tokenizer_config(path)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else bos
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos
        pad = tokenizer.pad_token_id
    written.append(_export.write_generation_config(path, bos, eos, pad))
    for file in written:
        if os.path.isfile(file):
            _export.publish(file)
