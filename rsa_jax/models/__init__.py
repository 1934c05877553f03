"""Flax NNX Llama-family models (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text), Hugging Face
safetensors and GGUF weight IO.

Stable API (the training code and the CLI rely on these names):
- `Llama(config, rngs=..., param_dtype, compute_dtype, remat, scan_layers, constrain)`;
  `model(input_ids, positions, attention_mask)` -> final normed hidden states [B, L, D];
  `model.unembedding()` -> [D, V] (tied models: the embedding transposed);
  `model.logits(hidden)` -> [B, L, V] float32.
- Every parameter has `logical_axes` metadata from `vocab`, `embed`, `heads`, `kv_heads`,
  `head_dim`, `mlp` (+ a leading `layers` when `scan_layers=True`); activations at block
  boundaries go through `constrain(x, ("batch", "length", "embed"))` when given.
- Attention runs through `jax.nn.dot_product_attention`; `LlamaConfig.attention` (or
  `load_hf(..., attention=)`) picks "auto" (cuDNN on a GPU in bf16/f16, else XLA), "xla" or
  "cudnn" (`attention_implementation`).
- `SUPPORTED`: the config.json `model_type`s read; Qwen3's q/k norms, Gemma 3's sliding layers,
  norms, GeGLU and soft-capping and Mistral's sliding window are `LlamaConfig` fields
  (docs/models.md); `window_allowed(allowed, query_pos, key_pos, window)` is the sliding mask.
- `LlamaConfig.from_hf(dict)` / `.from_dir(path)` / `.to_hf()`; `tiny_config(**overrides)`, a
  2-layer D=64 V=256 random-init config for tests.
- `load_hf(path, *, shardings=...)` reads a local HF directory tensor by tensor (optionally
  straight onto shardings); `save_hf(model, path, tokenizer=None, *, dtype, max_shard_size)`
  writes one transformers loads (float32/bfloat16, sharded above the limit, generation_config);
  `read_hf_tensor(path, name)` reads one stored tensor (a score model's head).
- `convert_gguf(gguf_path, out_dir)` -> HF directory (dequantised, q/k un-permuted, tokenizer and
  chat template from the metadata); `bundled_smollm2_gguf()`; CLI `python -m rsa_jax.models.convert`
  (`make model` -> artifacts/smollm2-135m).
- `check_model_dir(path)` / `check_tokenizer_dir(path)`: a one-line FileNotFoundError for a local
  model directory that does not exist or has no tokenizer files.
- LoRA / QLoRA (`_lora.py`): `LoraConfig(rank, alpha, targets, base_storage, block_size, dropout)`;
  `to_lora(model, lora, rngs=...)` converts a Llama in place (base stored as float32, bfloat16,
  int8 or nf4 via qwix; adapters B = 0); `split_lora(model)` -> `(LoraSpec, base, adapters)` flat
  dicts; `spec.module(base, adapters, dropout_key=None)` rebuilds it inside jit (`adapters=None`:
  adapters off); `spec.shardings(tree, fn)` maps logical axes to shardings;
  `save_merged_hf`, `save_peft`; `tree_bytes`, `param_count`; `project` is the one weight matmul.
- `store_in_compute_dtype(model)` (evaluation): the weights the forward casts to the compute
  dtype at every use (`cast_at_use`) stored in it, in place; the same outputs bit for bit.
- Sampling with a KV cache lives in `rsa_jax.generate.generate`.
"""

from rsa_jax.models._config import (
    ATTENTION_CHOICES,
    HF_CONFIG,
    SUPPORTED,
    LlamaConfig,
    tiny_config,
)
from rsa_jax.models._export import parse_size
from rsa_jax.models._gguf import bundled_smollm2_gguf, convert_gguf
from rsa_jax.models._llama import (
    REMAT_POLICIES,
    Llama,
    attention_implementation,
    cast_at_use,
    pick_layer_value,
    store_in_compute_dtype,
    window_allowed,
)
from rsa_jax.models._local import check_model_dir, check_tokenizer_dir
from rsa_jax.models._lora import (
    LoraConfig,
    LoraSpec,
    merge_into_base,
    merged_params,
    nest_params,
    param_count,
    peft_tensors,
    save_merged_hf,
    save_peft,
    split_lora,
    to_lora,
)
from rsa_jax.models._project import PROJECTIONS, project
from rsa_jax.models._quant import STORAGES, error_bound, nf4_codes, tree_bytes
from rsa_jax.models._weights import load_hf, read_hf_tensor, save_hf

__all__ = [
    "ATTENTION_CHOICES",
    "HF_CONFIG",
    "PROJECTIONS",
    "REMAT_POLICIES",
    "STORAGES",
    "SUPPORTED",
    "Llama",
    "LlamaConfig",
    "LoraConfig",
    "LoraSpec",
    "error_bound",
    "merged_params",
    "nest_params",
    "nf4_codes",
    "param_count",
    "peft_tensors",
    "project",
    "merge_into_base",
    "save_merged_hf",
    "save_peft",
    "split_lora",
    "to_lora",
    "tree_bytes",
    "attention_implementation",
    "cast_at_use",
    "store_in_compute_dtype",
    "bundled_smollm2_gguf",
    "check_model_dir",
    "check_tokenizer_dir",
    "convert_gguf",
    "load_hf",
    "pick_layer_value",
    "parse_size",
    "read_hf_tensor",
    "save_hf",
    "tiny_config",
    "window_allowed",
]
