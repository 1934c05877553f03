"""Decoder configuration read from a Hugging Face `config.json`.

Covers Llama 2/3 (with the llama3 RoPE scaling), SmolLM2 (tied embeddings), Qwen2/2.5 (q/k/v
biases), Mistral (grouped-query attention, sliding window), Qwen3 (per-head q/k RMSNorm) and
Gemma 3 text (`gemma3_text`: interleaved sliding-window and global layers with their own RoPE
bases, four norms per block with Gemma's `1 + weight` scale, GeGLU, scaled embeddings). Both the
old top-level `rope_theta` / `rope_scaling` and transformers 5's `rope_parameters` (for Gemma 3
one dict per layer type) are read. `docs/models.md` maps every field to its config.json key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

# A Hugging Face model directory's config file (a run directory's own names: training.RunDir).
HF_CONFIG = "config.json"

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
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
    # "linear" RoPE scaling (positions divided by the factor; Gemma 3's global layers)
    rope_linear_factor: float | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Attention kernel (not part of config.json): "auto" (cuDNN flash attention on a GPU in
    # bfloat16/float16, XLA otherwise), "xla" or "cudnn" (see `models.attention_implementation`).
    attention: str = "auto"
    # Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = False
    # RMSNorms scale by (norm_offset + weight): 1.0 for Gemma (weights stored around 0), else 0.
    norm_offset: float = 0.0
    # Gemma's four norms per block: the attention and MLP outputs are normed before their
    # residual add, and the MLP input has its own norm (`pre_feedforward_norm`).
    sandwich_norms: bool = False
    embed_scale: bool = False  # embeddings multiplied by sqrt(D) (Gemma)
    hidden_act: str = "silu"  # MLP gate activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    # One of LAYER_TYPES per layer; None: every layer full (global) attention.
    layer_types: tuple[str, ...] | None = None
    # Keys a query at position i sees on a sliding layer: positions i - W + 1 .. i.
    sliding_window: int | None = None
    rope_local_theta: float | None = None  # sliding layers' RoPE base; None: rope_theta
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5).
    query_pre_attn_scalar: float | None = None
    # scores -> c tanh(scores / c) (Gemma 2 style). `from_hf` drops it for gemma3_text with a
    # warning: Gemma 3 checkpoints set none and transformers' Gemma3 ignores it.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None  # logits -> c tanh(logits / c)

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"attention {self.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for "
                    f"{self.num_hidden_layers} layers"
                )
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(f"layer_types {unknown} are not among {LAYER_TYPES}")
        if any(self.sliding_layers()) and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError(
                f"sliding_window must be a positive integer on a model with sliding layers, "
                f"got {self.sliding_window!r}"
            )

    def sliding_layers(self) -> tuple[bool, ...]:
        """One flag per layer: True where the layer attends over the sliding window only."""
        if self.layer_types is None:
            return (False,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Builds the config from a parsed `config.json`; errors name the field."""
        model_type = hf.get("model_type")
        if model_type == "gemma3":
            raise ValueError(
                f"{source}: model_type 'gemma3' is the multimodal Gemma 3 "
                "(Gemma3ForConditionalGeneration); only the text model (model_type "
                "'gemma3_text', Gemma3ForCausalLM) is supported"
            )
        if model_type not in SUPPORTED:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported (supported: {SUPPORTED})"
            )

        def need(field):
            if field not in hf:
                raise ValueError(f"{source}: missing field {field!r}")
            return hf[field]

        gemma = model_type == "gemma3_text"
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        layers = int(need("num_hidden_layers"))
        rope = hf.get("rope_parameters") or {}
        local_rope: dict = {}
        if "full_attention" in rope or "sliding_attention" in rope:  # one dict per layer type
            local_rope = rope.get("sliding_attention") or {}
            rope = rope.get("full_attention") or {}
        default_theta = 1_000_000.0 if gemma else 10000.0
        theta = rope.get("rope_theta", hf.get("rope_theta", default_theta))
        llama3, linear = _rope_scaling(hf.get("rope_scaling") or rope, source, "rope_scaling")
        local_type = local_rope.get("rope_type", "default")
        if local_type not in ("default", None):
            raise ValueError(
                f"{source}: rope_parameters.sliding_attention.rope_type {local_type!r} is not "
                "supported (only 'default')"
            )
        local_theta = local_rope.get("rope_theta", hf.get("rope_local_base_freq"))
        if gemma and local_theta is None:
            local_theta = 10000.0
        layer_types, window = _layer_types(hf, model_type, layers, source)
        if "hidden_activation" in hf or "hidden_act" in hf:
            act = hf.get("hidden_activation") or hf.get("hidden_act")
        else:
            act = "gelu_pytorch_tanh" if gemma else "silu"
        if act not in ACTIVATIONS:
            raise ValueError(
                f"{source}: activation {act!r} is not supported (supported: {ACTIVATIONS})"
            )
        if gemma and hf.get("use_bidirectional_attention"):
            raise ValueError(f"{source}: use_bidirectional_attention=true is not supported")
        pre_attn = hf.get("query_pre_attn_scalar", 256 if gemma else None)
        attn_cap = _optional_float(hf.get("attn_logit_softcapping"))
        if gemma and attn_cap is not None:
            # transformers' Gemma3Attention never passes it to its attention function; applying
            # it would make this model differ from the one the checkpoint was trained as.
            warnings.warn(
                f"{source}: attn_logit_softcapping={attn_cap} is ignored, as transformers' "
                "Gemma3ForCausalLM ignores it",
                stacklevel=2,
            )
            attn_cap = None
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
            rope_theta=float(theta),
            rope_llama3=llama3,
            rope_linear_factor=linear,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            embed_scale=gemma,
            hidden_act=act,
            layer_types=layer_types,
            sliding_window=window,
            rope_local_theta=None if local_theta is None else float(local_theta),
            query_pre_attn_scalar=None if pre_attn is None else float(pre_attn),
            attn_logit_softcapping=attn_cap,
            final_logit_softcapping=_optional_float(hf.get("final_logit_softcapping")),
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
        """A `config.json` dict that transformers' config class of `model_type` reads."""
        architectures = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM",
        }
        gemma = self.model_type == "gemma3_text"
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
            "hidden_act": self.hidden_act,
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
        if self.rope_linear_factor is not None:
            out["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_linear_factor}
        if self.model_type in ("mistral", "qwen2", "qwen3", "gemma3_text"):
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None
        if self.layer_types is not None and self.model_type != "mistral":
            out["layer_types"] = list(self.layer_types)
        if gemma:
            out["hidden_activation"] = self.hidden_act
            out["rope_local_base_freq"] = self.rope_local_theta
            scalar = self.query_pre_attn_scalar
            # transformers' strict config wants an int here (it is one in every Gemma 3).
            if scalar is not None and scalar == int(scalar):
                scalar = int(scalar)
            out["query_pre_attn_scalar"] = scalar
            out["final_logit_softcapping"] = self.final_logit_softcapping
        if self.attn_logit_softcapping is not None:
            out["attn_logit_softcapping"] = self.attn_logit_softcapping
        return out


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _rope_scaling(scaling: dict, source: str, field: str):
    """(llama3 tuple or None, linear factor or None) of a rope scaling dict."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        llama3 = (
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
        return llama3, None
    if rope_type == "linear":
        return None, float(scaling["factor"])
    if rope_type not in ("default", None):
        raise ValueError(f"{source}: {field} type {rope_type!r} is not supported")
    return None, None


def _layer_types(hf: dict, model_type: str, layers: int, source: str):
    """(layer_types or None, sliding_window or None) as transformers derives them per family.

    Mistral: every layer slides when `sliding_window` is set (transformers' default 4096 when
    the key is absent). Qwen2/Qwen3: only with `use_sliding_window`, on layers from
    `max_window_layers` on, unless `layer_types` says otherwise. Gemma 3: `layer_types`, else
    every `sliding_window_pattern`-th layer (default 6) is global and the others slide.
    """
    given = hf.get("layer_types")
    if model_type == "mistral":
        window = hf.get("sliding_window", 4096)
        return (None, None) if window is None else (("sliding_attention",) * layers, int(window))
    if model_type in ("qwen2", "qwen3"):
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
        if given is None:
            start = int(hf.get("max_window_layers", 28))
            given = [
                "sliding_attention" if window is not None and i >= start else "full_attention"
                for i in range(layers)
            ]
        if "sliding_attention" not in given:
            return None, None
        return tuple(given), None if window is None else int(window)
    if model_type == "gemma3_text":
        window = hf.get("sliding_window", 4096)
        if given is None:
            pattern = int(hf.get("sliding_window_pattern", 6))
            given = [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(layers)
            ]
        if len(given) != layers:
            raise ValueError(f"{source}: layer_types has {len(given)} entries for {layers} layers")
        return tuple(given), None if window is None else int(window)
    return None, None


# What `tiny_config(model_type=...)` adds for each family, so that every feature is exercised
# by a 2-layer model: head_dim differs from D / H, one sliding and one global layer with a
# window of 3 tokens, a linear-scaled global RoPE.
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3": dict(qk_norm=True, head_dim=24, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "gemma3_text": dict(
        qk_norm=True,
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=True,
        hidden_act="gelu_pytorch_tanh",
        head_dim=24,
        rms_norm_eps=1e-6,
        layer_types=("sliding_attention", "full_attention"),
        sliding_window=3,
        rope_theta=1_000_000.0,
        rope_local_theta=10000.0,
        rope_linear_factor=8.0,
        query_pre_attn_scalar=32.0,
    ),
    "mistral": dict(layer_types=("sliding_attention", "sliding_attention"), sliding_window=3),
}


def tiny_config(**overrides) -> LlamaConfig:
    """A tiny random-init Llama for tests: 2 layers, D=64, 4 heads / 2 KV heads, V=256.

    With `model_type` in TINY_FAMILIES, that family's features are switched on first (any
    other override still wins).
    """
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
    base.update(TINY_FAMILIES.get(overrides.get("model_type", "llama"), {}))
    base.update(overrides)
    return LlamaConfig(**base)
