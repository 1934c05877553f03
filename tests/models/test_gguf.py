"""GGUF conversion on a tiny self-made GGUF file: exact weights after un-permuting q/k; errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from rsa_jax.models import Llama, LlamaConfig, save_hf, tiny_config
from rsa_jax.models._gguf import convert_gguf

gguf = pytest.importorskip("gguf")


def _permute(w, heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of our un-permute)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_gguf(path, tensors, config, *, arch="llama", drop=(), bad_type=None):
    from tokenizers import pre_tokenizers

    writer = gguf.GGUFWriter(str(path), arch)
    fields = {
        "block_count": config.num_hidden_layers,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "rope.freq_base": config.rope_theta,
        "context_length": config.max_position_embeddings,
    }
    for key, value in fields.items():
        if key in drop:
            continue
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())[: config.vocab_size - 3]
    tokens += [tokens[0] + tokens[1], "<|im_start|>", "<|im_end|>"]  # one merge result
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    writer.add_token_merges([f"{tokens[0]} {tokens[1]}"])
    writer.add_eos_token_id(len(tokens) - 1)
    for name, w in tensors.items():
        if name == bad_type:
            # IQ2_XXS: 66 bytes per block of 256 values along a row.
            raw = np.zeros((w.shape[0], w.shape[1] // 256 * 66), np.uint8)
            writer.add_tensor(
                name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS
            )
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensors(hf, config):
    names = {v: k for k, v in
             {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight"}.items()}  # fmt: skip
    layer = {
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
    }
    out = {}
    for name, w in hf.items():
        if name in names:
            out[names[name]] = w
            continue
        _, _, i, rest = name.split(".", 3)
        if rest == "self_attn.q_proj.weight":
            w = _permute(w, config.num_attention_heads)
        elif rest == "self_attn.k_proj.weight":
            w = _permute(w, config.num_key_value_heads)
        out[f"blk.{i}.{layer[rest]}"] = np.ascontiguousarray(w)
    return out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    config = tiny_config(hidden_size=256, head_dim=64, intermediate_size=256, num_hidden_layers=1)
    path = tmp_path_factory.mktemp("hf")
    save_hf(Llama(config, rngs=nnx.Rngs(0)), str(path))
    return config, load_file(str(path / "model.safetensors"))


def test_converted_gguf_equals_the_original_weights(tmp_path, tiny_hf):
    config, hf = tiny_hf
    _write_gguf(tmp_path / "m.gguf", _gguf_tensors(hf, config), config)
    out = convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "out"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got.keys() == hf.keys()
    for name in hf:
        np.testing.assert_array_equal(got[name], hf[name], err_msg=name)
    converted = LlamaConfig.from_dir(out)
    assert converted.tie_word_embeddings and converted.num_key_value_heads == 2
    assert converted.head_dim == 64 and converted.eos_token_id == config.vocab_size - 1
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_bad_gguf_errors_name_the_field_or_tensor(tmp_path, tiny_hf):
    config, hf = tiny_hf
    tensors = _gguf_tensors(hf, config)
    _write_gguf(tmp_path / "a.gguf", tensors, config, bad_type="blk.0.ffn_up.weight")
    with pytest.raises(ValueError, match="'blk.0.ffn_up.weight' has unsupported type IQ2_XXS"):
        convert_gguf(str(tmp_path / "a.gguf"), str(tmp_path / "a"))
    _write_gguf(tmp_path / "b.gguf", tensors, config, arch="gpt2")
    with pytest.raises(ValueError, match="general.architecture 'gpt2' is not supported"):
        convert_gguf(str(tmp_path / "b.gguf"), str(tmp_path / "b"))
    _write_gguf(tmp_path / "c.gguf", tensors, config, drop=("block_count",))
    with pytest.raises(ValueError, match="missing GGUF field llama.block_count"):
        convert_gguf(str(tmp_path / "c.gguf"), str(tmp_path / "c"))
    assert not (tmp_path / "a").exists()  # nothing half-written
