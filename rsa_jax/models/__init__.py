"""Flax NNX Llama-family models, Hugging Face safetensors and GGUF weight IO.

Stable API (the training code and the CLI rely on these names):
- `Llama(config, rngs=..., param_dtype, compute_dtype, remat, scan_layers, constrain)`;
  `model(input_ids, positions, attention_mask)` -> final normed hidden states [B, L, D];
  `model.unembedding()` -> [D, V] (tied models: the embedding transposed);
  `model.logits(hidden)` -> [B, L, V] float32.
- Every parameter has `logical_axes` metadata from `vocab`, `embed`, `heads`, `kv_heads`,
  `head_dim`, `mlp` (+ a leading `layers` when `scan_layers=True`); activations at block
  boundaries go through `constrain(x, ("batch", "length", "embed"))` when given.
- `LlamaConfig.from_hf(dict)` / `.from_dir(path)` / `.to_hf()`; `tiny_config(**overrides)`, a
  2-layer D=64 V=256 random-init config for tests.
- `load_hf(path, *, shardings=...)` reads a local HF directory tensor by tensor (optionally
  straight onto shardings); `save_hf(model, path, tokenizer=None, *, dtype, max_shard_size)`
  writes one transformers loads (float32/bfloat16, sharded above the limit, generation_config).
- `convert_gguf(gguf_path, out_dir)` -> HF directory (dequantised, q/k un-permuted, tokenizer and
  chat template from the metadata); `bundled_smollm2_gguf()`; CLI `python -m rsa_jax.models.convert`
  (`make model` -> artifacts/smollm2-135m).
- `check_model_dir(path)` / `check_tokenizer_dir(path)`: a one-line FileNotFoundError for a local
  model directory that does not exist or has no tokenizer files.
- Sampling with a KV cache lives in `rsa_jax.generate.generate`.
"""

from rsa_jax.models._config import LlamaConfig, tiny_config
from rsa_jax.models._export import parse_size
from rsa_jax.models._gguf import bundled_smollm2_gguf, convert_gguf
from rsa_jax.models._llama import REMAT_POLICIES, Llama, attention_allowed, rope_frequencies
from rsa_jax.models._local import check_model_dir, check_tokenizer_dir
from rsa_jax.models._weights import hf_name, load_hf, save_hf

__all__ = [
    "REMAT_POLICIES",
    "Llama",
    "LlamaConfig",
    "attention_allowed",
    "bundled_smollm2_gguf",
    "check_model_dir",
    "check_tokenizer_dir",
    "convert_gguf",
    "hf_name",
    "load_hf",
    "parse_size",
    "rope_frequencies",
    "save_hf",
    "tiny_config",
]
