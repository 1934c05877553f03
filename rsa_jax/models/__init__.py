"""Flax NNX Llama-family models and Hugging Face safetensors weight IO.

`Llama(config, rngs=...)` -> `model(input_ids, positions, attention_mask)` gives final hidden
states [B, L, D]; `model.unembedding()` is the [D, V] matrix the fused loss head takes;
`model.logits(hidden)` the [B, L, V] float32 logits. `load_hf` / `save_hf` read and write local
Hugging Face directories.
"""

from rsa_jax.models._config import LlamaConfig, tiny_config
from rsa_jax.models._llama import Llama, attention_allowed, rope_frequencies
from rsa_jax.models._weights import hf_name, load_hf, save_hf

__all__ = [
    "Llama",
    "LlamaConfig",
    "attention_allowed",
    "hf_name",
    "load_hf",
    "rope_frequencies",
    "save_hf",
    "tiny_config",
]
