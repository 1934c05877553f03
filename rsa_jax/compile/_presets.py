"""Named architectures (shapes only, from each model's published `config.json`), so a run can be
planned and compiled before any weights are downloaded.

`model.path` of a compiled config may name a preset (`llama-2-7b`), a Hugging Face directory
(only its `config.json` is read), or `tiny`.
"""

from __future__ import annotations

import os
from typing import Any

from rsa_jax.models import LlamaConfig

_LLAMA2: dict[str, Any] = dict(
    vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1
)
_LLAMA3: dict[str, Any] = dict(
    vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000
)
_LLAMA31_ROPE = (8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, LlamaConfig] = {
    "llama-2-7b": LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
        eos_token_id=2,
        **_LLAMA2,
    ),
    "llama-2-13b": LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        head_dim=128,
        max_position_embeddings=4096,
        eos_token_id=2,
        **_LLAMA2,
    ),
    "llama-3-8b": LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        eos_token_id=128001,
        **_LLAMA3,
    ),
    "llama-3.1-8b": LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_llama3=_LLAMA31_ROPE,
        eos_token_id=128001,
        **_LLAMA3,
    ),
    "llama-3-70b": LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        eos_token_id=128001,
        **_LLAMA3,
    ),
    "qwen2.5-7b": LlamaConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=True,
        max_position_embeddings=32768,
        model_type="qwen2",
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "mistral-7b": LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=10000.0,
        max_position_embeddings=32768,
        model_type="mistral",
        bos_token_id=1,
        eos_token_id=2,
    ),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def architecture(path: str) -> LlamaConfig | None:
    """The architecture `model.path` names without reading weights: a preset, or the directory's
    `config.json`; None for `tiny` (its vocabulary comes from its in-memory tokenizer).
    ValueError naming the presets when `path` is neither."""
    if path == "tiny":
        return None
    if path in PRESETS:
        return PRESETS[path]
    if os.path.isdir(path):
        return LlamaConfig.from_dir(path)
    raise ValueError(
        f"model.path {path!r} is neither an architecture preset ({', '.join(PRESETS)}) nor a "
        "directory with a config.json"
    )


def parameter_count(llama: LlamaConfig) -> int:
    """Parameters of the full model (embeddings, blocks, norms, untied unembedding)."""
    d, f, hd = llama.hidden_size, llama.intermediate_size, llama.head_dim
    q, kv = llama.num_attention_heads * hd, llama.num_key_value_heads * hd
    block = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    if llama.attention_bias:
        block += q + 2 * kv
    embed = llama.vocab_size * d * (1 if llama.tie_word_embeddings else 2)
    return llama.num_hidden_layers * block + embed + d
