"""Random score-model directories and a slow NumPy score reference (test and bench support).

`write_score_dir` writes a Hugging Face directory in either format with self-made random
weights (HF tensor names and [out, in] layout) and a small offline tokenizer, so no hub is
needed. `reference_scores` scores token rows with the independent NumPy Llama forward
(`llama_reference.forward`), one unpadded row at a time, and each format's own read-out rule
written out here again, not shared with the code under test.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from rsa_jax.models import HF_CONFIG
from rsa_jax.testing import llama_reference

# safe-rlhf LlamaForScore and transformers' sequence-classification formats.
FORMATS = ("safe_rlhf", "llama_seq_cls", "qwen2_seq_cls")


def _tiny_hf_config(fmt: str, vocab_size: int) -> dict:
    config = {
        "model_type": "qwen2" if fmt == "qwen2_seq_cls" else "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "attention_bias": fmt == "qwen2_seq_cls",
        "hidden_act": "silu",
    }
    return config


def random_tensors(config: dict, head: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """float32 HF tensors of a Llama-family backbone (no LM head) plus `head` name -> shape."""
    rng = np.random.default_rng(seed)
    d, f = config["hidden_size"], config["intermediate_size"]
    h, k, e = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def normal(*shape, scale=0.2):
        return (scale * rng.normal(size=shape)).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": normal(config["vocab_size"], d, scale=1.0),
        "model.norm.weight": (1.0 + normal(d, scale=0.1)),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(h * e, d)
        tensors[p + "self_attn.k_proj.weight"] = normal(k * e, d)
        tensors[p + "self_attn.v_proj.weight"] = normal(k * e, d)
        tensors[p + "self_attn.o_proj.weight"] = normal(d, h * e)
        if config.get("attention_bias"):
            tensors[p + "self_attn.q_proj.bias"] = normal(h * e)
            tensors[p + "self_attn.k_proj.bias"] = normal(k * e)
            tensors[p + "self_attn.v_proj.bias"] = normal(k * e)
        tensors[p + "mlp.gate_proj.weight"] = normal(f, d)
        tensors[p + "mlp.up_proj.weight"] = normal(f, d)
        tensors[p + "mlp.down_proj.weight"] = normal(d, f)
        tensors[p + "input_layernorm.weight"] = 1.0 + normal(d, scale=0.1)
        tensors[p + "post_attention_layernorm.weight"] = 1.0 + normal(d, scale=0.1)
    for name, shape in head.items():
        tensors[name] = normal(*shape, scale=1.0)
    return tensors


def write_score_dir(
    path: str,
    fmt: str,
    *,
    seed: int = 0,
    score_dim: int = 1,
    safe_rlhf_fields: dict | None = None,
    pad_token_id: int | None = None,
    tokenizer=None,
) -> tuple[dict, dict]:
    """Writes a random score model in format `fmt` (one of FORMATS) to `path`.

    Args:
      safe_rlhf_fields: extra config.json fields of a safe-rlhf model (`bias`, `score_type`,
        `do_normalize`, `mean`, `var`, ...).
      pad_token_id: config.json's pad_token_id of a sequence-classification model (default:
        the tokenizer's pad id).
      tokenizer: saved into the directory (default: `rsa_jax.data.train_bpe_tokenizer()`).

    Returns:
      (tensors, config.json dict).
    """
    from safetensors.numpy import save_file

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    if tokenizer is None:
        from rsa_jax.data import train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer()
    os.makedirs(path, exist_ok=True)
    config = _tiny_hf_config(fmt, vocab_size=len(tokenizer))
    config["bos_token_id"] = tokenizer.bos_token_id
    config["eos_token_id"] = tokenizer.eos_token_id
    if fmt == "safe_rlhf":
        fields = {"bias": True, "score_dim": score_dim, "score_type": "reward"}
        fields.update(safe_rlhf_fields or {})
        config.update(fields, architectures=["LlamaForScore"])
        head: dict[str, tuple[int, ...]] = {
            "score_head.weight": (fields["score_dim"], config["hidden_size"])
        }
        if fields["bias"]:
            head["score_head.bias"] = (fields["score_dim"],)
        tensors = random_tensors(config, head, seed)
        with open(os.path.join(path, HF_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
    else:
        from transformers import LlamaConfig, Qwen2Config

        cls, arch = (
            (Qwen2Config, "Qwen2ForSequenceClassification")
            if fmt == "qwen2_seq_cls"
            else (LlamaConfig, "LlamaForSequenceClassification")
        )
        pad: Any = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        tensors = random_tensors(config, {"score.weight": (score_dim, config["hidden_size"])}, seed)
        fields = {k: v for k, v in config.items() if k not in ("model_type", "rope_theta")}
        hf = cls(
            **fields,
            rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
            pad_token_id=pad,
            architectures=[arch],
        )
        hf.num_labels = score_dim  # a property of PretrainedConfig: sets id2label
        hf.save_pretrained(path)  # transformers' own config class writes config.json
        with open(os.path.join(path, HF_CONFIG)) as f:
            config = json.load(f)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    tokenizer.save_pretrained(path)
    return tensors, config


def reference_scores(tensors: dict, config: dict, rows: list[list[int]]) -> np.ndarray:
    """[N, S] float64 scores of token rows (each unpadded), read out as the format does.

    safe-rlhf: the head (with its bias) at the row's last token, then the normalizer of
    `score_type` when `do_normalize`; sequence classification: `score.weight` at the rightmost
    token that is not `pad_token_id` (the last token without one).
    """
    out = []
    safe_rlhf = "score_head.weight" in tensors
    for row in rows:
        ids = np.asarray([row])
        length = len(row)
        hidden = llama_reference.forward(
            tensors, config, ids, np.arange(length)[None], np.ones((1, length), bool)
        )[0]
        if safe_rlhf:
            score = hidden[-1] @ np.asarray(tensors["score_head.weight"], np.float64).T
            if "score_head.bias" in tensors:
                score = score + tensors["score_head.bias"]
            if config.get("do_normalize"):
                dim = len(score)
                mean = np.asarray(config.get("mean") or [0.0] * dim)
                std = np.sqrt(np.asarray(config.get("var") or [1.0] * dim)) + 1e-8
                kind = config.get("score_type", "reward")
                score = (score - mean) / std if kind == "reward" else score
                score = score / std if kind == "cost" else score
        else:
            pad = config.get("pad_token_id")
            position = length - 1
            if pad is not None:
                real = [i for i, t in enumerate(row) if t != pad]
                position = real[-1] if real else 0
            score = hidden[position] @ np.asarray(tensors["score.weight"], np.float64).T
        out.append(score)
    return np.asarray(out)
