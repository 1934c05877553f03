"""A slow NumPy decoder forward on Hugging Face tensors (names and [out, in] layout), float64.

Independent of the NNX model: it reads the tensors and `config.json` as `transformers` stores
them and follows the Hugging Face definitions step by step (RMSNorm, rotate-half RoPE,
grouped-query attention with a causal mask over real tokens, SwiGLU), looping over sequences,
heads and query positions. Covers Llama, Qwen2, Mistral (sliding window), Qwen3 (q/k norms) and
Gemma 3 text (`1 + weight` norms, four per block, scaled embeddings, GeGLU, query_pre_attn_scalar,
sliding and global layers with their own RoPE bases, soft-capping). The sliding window is
counted in sequence slots (`j > i - window`), as transformers' masks do.
"""

from __future__ import annotations

import math

import numpy as np


def _rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _inv_freq(config: dict, layer_type: str = "full_attention") -> np.ndarray:
    e = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    gemma = config["model_type"] == "gemma3_text"
    params = config.get("rope_parameters") or {}
    if layer_type in params:
        params = params[layer_type]
    if gemma and layer_type == "sliding_attention":
        theta = params.get("rope_theta", config.get("rope_local_base_freq", 10000.0))
        return 1.0 / (theta ** (np.arange(0, e, 2) / e))
    theta = config.get("rope_theta", params.get("rope_theta", 1e6 if gemma else None))
    inv = 1.0 / (theta ** (np.arange(0, e, 2) / e))
    scaling = config.get("rope_scaling") or params
    if scaling.get("rope_type") == "linear":
        return inv / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        original = scaling["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelength = 2 * math.pi / f
            if wavelength < original / high:
                out.append(f)
            elif wavelength > original / low:
                out.append(f / factor)
            else:
                smooth = (original / wavelength - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        inv = np.array(out)
    return inv


def _rope(x, position, inv_freq):
    """x [E] at one position: HF rotate_half convention."""
    angles = position * inv_freq
    cos = np.concatenate([np.cos(angles)] * 2)
    sin = np.concatenate([np.sin(angles)] * 2)
    half = len(x) // 2
    rotated = np.concatenate([-x[half:], x[:half]])
    return x * cos + rotated * sin


def _layer_types(config: dict) -> list[str]:
    n = config["num_hidden_layers"]
    kind = config["model_type"]
    if kind == "mistral":
        return ["sliding_attention" if config.get("sliding_window") else "full_attention"] * n
    if config.get("layer_types"):
        return list(config["layer_types"])
    if kind == "gemma3_text":
        pattern = config.get("sliding_window_pattern", 6)
        return [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)
        ]
    return ["full_attention"] * n


def forward(tensors: dict, config: dict, input_ids, positions, attention_mask) -> np.ndarray:
    """Final normed hidden states [B, L, D] (float64) of a HF decoder checkpoint."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    gemma = config["model_type"] == "gemma3_text"
    h_heads = config["num_attention_heads"]
    k_heads = config.get("num_key_value_heads") or h_heads
    e = config.get("head_dim") or config["hidden_size"] // h_heads
    eps = config.get("rms_norm_eps", 1e-6 if gemma else 1e-5)
    offset = 1.0 if gemma else 0.0

    def norm(x, name):
        return _rms_norm(x, offset + t[name], eps)

    scale = (config.get("query_pre_attn_scalar", 256) if gemma else e) ** -0.5
    softcap = config.get("attn_logit_softcapping")
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    layer_types = _layer_types(config)
    window = config.get("sliding_window") or 0
    b_size, length = np.shape(input_ids)
    out = np.zeros((b_size, length, config["hidden_size"]))
    for b in range(b_size):
        x = t["model.embed_tokens.weight"][np.asarray(input_ids[b])]  # [L, D]
        if gemma:
            x = x * np.sqrt(config["hidden_size"])
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            sliding = layer_types[layer] == "sliding_attention"
            inv_freq = _inv_freq(config, layer_types[layer])
            hn = norm(x, p + "input_layernorm.weight")
            q = hn @ t[p + "self_attn.q_proj.weight"].T
            k = hn @ t[p + "self_attn.k_proj.weight"].T
            v = hn @ t[p + "self_attn.v_proj.weight"].T
            if p + "self_attn.q_proj.bias" in t:
                q = q + t[p + "self_attn.q_proj.bias"]
                k = k + t[p + "self_attn.k_proj.bias"]
                v = v + t[p + "self_attn.v_proj.bias"]
            attn = np.zeros((length, h_heads * e))
            for head in range(h_heads):
                kv = head // (h_heads // k_heads)
                keys = []
                for j in range(length):
                    kj = k[j, kv * e : (kv + 1) * e]
                    if p + "self_attn.k_norm.weight" in t:
                        kj = norm(kj, p + "self_attn.k_norm.weight")
                    keys.append(_rope(kj, positions[b][j], inv_freq))
                for i in range(length):
                    if not attention_mask[b][i]:
                        continue  # padding queries: output unused
                    qi = q[i, head * e : (head + 1) * e]
                    if p + "self_attn.q_norm.weight" in t:
                        qi = norm(qi, p + "self_attn.q_norm.weight")
                    qi = _rope(qi, positions[b][i], inv_freq)
                    visible = [
                        j
                        for j in range(i + 1)
                        if attention_mask[b][j] and not (sliding and j <= i - window)
                    ]
                    scores = np.array([qi @ keys[j] for j in visible]) * scale
                    if softcap is not None:
                        scores = softcap * np.tanh(scores / softcap)
                    w = np.exp(scores - scores.max())
                    w /= w.sum()
                    attn[i, head * e : (head + 1) * e] = sum(
                        wj * v[j, kv * e : (kv + 1) * e] for wj, j in zip(w, visible, strict=True)
                    )
            attn = attn @ t[p + "self_attn.o_proj.weight"].T
            if gemma:
                x = x + norm(attn, p + "post_attention_layernorm.weight")
                hn = norm(x, p + "pre_feedforward_layernorm.weight")
            else:
                x = x + attn
                hn = norm(x, p + "post_attention_layernorm.weight")
            gate = hn @ t[p + "mlp.gate_proj.weight"].T
            up = hn @ t[p + "mlp.up_proj.weight"].T
            if act == "silu":
                gate = gate / (1 + np.exp(-gate))
            else:  # gelu_pytorch_tanh
                c = math.sqrt(2 / math.pi)
                gate = 0.5 * gate * (1 + np.tanh(c * (gate + 0.044715 * gate**3)))
            y = (gate * up) @ t[p + "mlp.down_proj.weight"].T
            if gemma:
                y = norm(y, p + "post_feedforward_layernorm.weight")
            x = x + y
        out[b] = norm(x, "model.norm.weight")
    return out


def logits(tensors: dict, config: dict, hidden) -> np.ndarray:
    """[B, L, D] final hidden -> [B, L, V] float64 logits (tied or not, soft-capped if set)."""
    tied = config.get("tie_word_embeddings", config["model_type"] == "gemma3_text")
    w = tensors["model.embed_tokens.weight" if tied else "lm_head.weight"]
    out = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64).T
    cap = config.get("final_logit_softcapping")
    return out if cap is None else cap * np.tanh(out / cap)
