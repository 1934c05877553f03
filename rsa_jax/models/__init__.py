"""Flax NNX Llama-family models, Hugging Face safetensors and GGUF weight IO.

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
- `LlamaConfig.from_hf(dict)` / `.from_dir(path)` / `.to_hf()`; `tiny_config(**overrides)`, a
  2-layer D=64 V=256 random-init config for tests.
- `load_hf(path, *, shardings=...)` reads a local HF directory tensor by tensor (optionally
  straight onto shardings); `save_hf(model, path, tokenizer=None)` writes one transformers loads.
- `convert_gguf(gguf_path, out_dir)` -> HF directory (dequantised, q/k un-permuted, tokenizer and
  chat template from the metadata); `bundled_smollm2_gguf()`; CLI `python -m rsa_jax.models.convert`
  (`make model` -> artifacts/smollm2-135m).
- Sampling with a KV cache lives in `rsa_jax.generate.generate`.
"""

from rsa_jax.models._config import LlamaConfig, tiny_config
from rsa_jax.models._gguf import bundled_smollm2_gguf, convert_gguf
from rsa_jax.models._llama import (
    REMAT_POLICIES,
    Llama,
    attention_allowed,
    attention_implementation,
    rope_frequencies,
)
from rsa_jax.models._weights import hf_name, load_hf, save_hf

__all__ = [
    "REMAT_POLICIES",
    "Llama",
    "LlamaConfig",
    "attention_allowed",
    "attention_implementation",
    "bundled_smollm2_gguf",
    "convert_gguf",
    "hf_name",
    "load_hf",
    "rope_frequencies",
    "save_hf",
    "tiny_config",
]
