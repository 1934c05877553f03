"""Llama-family configuration read from a Hugging Face `config.json`.

Covers Llama 2/3 (with the llama3 RoPE scaling), SmolLM2 (tied embeddings), Qwen2/2.5 (q/k/v
biases) and Mistral-style grouped-query attention. Both the old top-level `rope_theta` /
`rope_scaling` and transformers 5's `rope_parameters` are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED = ("llama", "mistral", "qwen2")
ATTENTION_CHOICES = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # K (GQA groups)
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # llama3 scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: tuple[float, float, float, int] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Attention kernel (not part of config.json): "auto" (cuDNN flash attention on a GPU in
    # bfloat16/float16, XLA otherwise), "xla" or "cudnn" (see `models.attention_implementation`).
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"attention {self.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Builds the config from a parsed `config.json`; errors name the field."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported (supported: {SUPPORTED})"
            )

        def need(field):
            if field not in hf:
                raise ValueError(f"{source}: missing field {field!r}")
            return hf[field]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or rope
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        llama3 = None
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "llama3":
            llama3 = (
                float(scaling["factor"]),
                float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                int(scaling["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported")
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_llama3=llama3,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    @classmethod
    def from_dir(cls, path: str) -> LlamaConfig:
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
        with open(config_path, "rb") as f:
            try:
                values = json.loads(f.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_path}: not JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got {type(values).__name__}")
        return cls.from_hf(values, config_path)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' LlamaConfig/Qwen2Config/MistralConfig read."""
        architectures = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }
        out = {
            "architectures": [architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
        if self.rope_llama3 is not None:
            factor, low, high, original = self.rope_llama3
            out["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
        return out


def tiny_config(**overrides) -> LlamaConfig:
    """A tiny random-init Llama for tests: 2 layers, D=64, 4 heads / 2 KV heads, V=256."""
    base: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    base.update(overrides)
    return LlamaConfig(**base)
