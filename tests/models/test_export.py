"""Export: dtype, sharding above a size limit (read back by load_hf and transformers' index
layout), file permissions, a portable tokenizer_config.json and generation_config.json."""

from __future__ import annotations

import json
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from rsa_jax.data import train_bpe_tokenizer
from rsa_jax.models import Llama, load_hf, save_hf, tiny_config

IDS = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6) % 200)
POS = jnp.asarray(np.tile(np.arange(6, dtype=np.int32), (2, 1)))
MASK = jnp.ones((2, 6), bool)


@pytest.fixture(scope="module")
def model():
    return Llama(tiny_config(), rngs=nnx.Rngs(3))


def _params(m) -> dict:
    return {
        "/".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
    }


def test_sharded_bfloat16_export_round_trips(tmp_path, model):
    out = tmp_path / "bf16"
    total = sum(v.size for v in _params(model).values()) * 2  # bytes in bfloat16
    save_hf(model, str(out), dtype="bfloat16", max_shard_size=total // 3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == total
    for shard in shards:
        assert (out / shard).stat().st_size <= total // 3 + 4096  # header slack only
        with safe_open(str(out / shard), framework="numpy") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"bfloat16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_hf(str(out))
    for key, value in _params(model).items():
        rounded = value.astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(_params(again)[key], rounded, err_msg=key)
    # float32 below the limit: one file, exact, and the stale shards are gone.
    save_hf(model, str(out), dtype="float32")
    assert (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-*.safetensors"))
    a = model(IDS, POS, MASK)
    b = load_hf(str(out))(IDS, POS, MASK)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_hf(model, str(tmp_path / "x"), dtype="float16")


def test_files_are_readable_by_others_and_portable(tmp_path, model):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = train_bpe_tokenizer()
    src = tmp_path / "src"
    tokenizer.save_pretrained(str(src))
    loaded = AutoTokenizer.from_pretrained(str(src), local_files_only=True)  # machine-local keys
    loaded.init_kwargs["source_dir"] = str(src)  # an absolute path of this machine
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        save_hf(model, str(out), tokenizer=loaded)
    finally:
        os.umask(old)
    files = sorted(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(files)
    assert "tokenizer_config.json" in files
    for name in files:
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))
    text = (out / "tokenizer_config.json").read_text()
    values = json.loads(text)
    assert "local_files_only" not in values and "is_local" not in values
    assert str(tmp_path) not in text and "source_dir" not in values
    assert values["eos_token"] == "<|im_end|>"
    generation = GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == loaded.eos_token_id
    assert generation.pad_token_id == loaded.pad_token_id
    again = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert again("hi <|im_end|>")["input_ids"] == loaded("hi <|im_end|>")["input_ids"]
