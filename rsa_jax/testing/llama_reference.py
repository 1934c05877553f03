"""A slow NumPy Llama forward on Hugging Face tensors (names and [out, in] layout), float64.

Independent of the NNX model: it reads the tensors as `transformers` stores them and follows
the Hugging Face Llama definition step by step (RMSNorm, rotate-half RoPE, grouped-query
attention with a causal mask over real tokens, SwiGLU), looping over sequences, heads and
query positions.
"""

from __future__ import annotations

import math

import numpy as np


def _rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _inv_freq(config: dict) -> np.ndarray:
    e = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    inv = 1.0 / (theta ** (np.arange(0, e, 2) / e))
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "llama3":
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


def forward(tensors: dict, config: dict, input_ids, positions, attention_mask) -> np.ndarray:
    """Final normed hidden states [B, L, D] (float64) of a HF Llama-family checkpoint."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    h_heads = config["num_attention_heads"]
    k_heads = config.get("num_key_value_heads") or h_heads
    e = config.get("head_dim") or config["hidden_size"] // h_heads
    eps = config.get("rms_norm_eps", 1e-5)
    inv_freq = _inv_freq(config)
    b_size, length = np.shape(input_ids)
    out = np.zeros((b_size, length, config["hidden_size"]))
    for b in range(b_size):
        x = t["model.embed_tokens.weight"][np.asarray(input_ids[b])]  # [L, D]
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            hn = _rms_norm(x, t[p + "input_layernorm.weight"], eps)
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
                keys = [
                    _rope(k[j, kv * e : (kv + 1) * e], positions[b][j], inv_freq)
                    for j in range(length)
                ]
                for i in range(length):
                    if not attention_mask[b][i]:
                        continue  # padding queries: output unused
                    qi = _rope(q[i, head * e : (head + 1) * e], positions[b][i], inv_freq)
                    visible = [j for j in range(i + 1) if attention_mask[b][j]]
                    scores = np.array([qi @ keys[j] for j in visible]) / math.sqrt(e)
                    w = np.exp(scores - scores.max())
                    w /= w.sum()
                    attn[i, head * e : (head + 1) * e] = sum(
                        wj * v[j, kv * e : (kv + 1) * e] for wj, j in zip(w, visible, strict=True)
                    )
            x = x + attn @ t[p + "self_attn.o_proj.weight"].T
            hn = _rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
            gate = hn @ t[p + "mlp.gate_proj.weight"].T
            up = hn @ t[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
        out[b] = _rms_norm(x, t["model.norm.weight"], eps)
    return out
