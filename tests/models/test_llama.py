"""The NNX Llama against an independent NumPy forward; HF safetensors round trip; bad input."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from rsa_jax.models import Llama, LlamaConfig, load_hf, save_hf, tiny_config
from rsa_jax.testing import llama_reference

# Left-padded prompts and right-padded responses, as the data pipeline lays them out.
MASK = np.array(
    [[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]], bool
)
POSITIONS = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)


def _random_model(config, seed=0):
    model = Llama(config, rngs=nnx.Rngs(seed))
    # Non-trivial norms and biases so that every tensor matters in the comparison.
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("weight", "q_bias", "k_bias", "v_bias"):
            var.set_value(jnp.asarray(1.0 + 0.1 * rng.normal(size=var.shape), var.dtype))
    return model


CONFIGS = {
    "smollm2-like (tied)": tiny_config(),
    "qwen2-like (biases, untied)": tiny_config(
        model_type="qwen2", attention_bias=True, tie_word_embeddings=False
    ),
    "llama3 rope scaling": tiny_config(rope_llama3=(8.0, 1.0, 4.0, 64), rope_theta=500000.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_numpy_reference(tmp_path, name):
    model = _random_model(CONFIGS[name])
    save_hf(model, str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json") as f:
        hf_config = json.load(f)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, size=MASK.shape)
    want = llama_reference.forward(tensors, hf_config, ids, POSITIONS, MASK)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(POSITIONS), jnp.asarray(MASK)))
    np.testing.assert_allclose(got[MASK], want[MASK], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()  # padding rows stay finite too


def test_round_trip_is_exact_and_transformers_reads_the_config(tmp_path):
    model = _random_model(CONFIGS["qwen2-like (biases, untied)"], seed=3)
    save_hf(model, str(tmp_path / "a"))
    loaded = load_hf(str(tmp_path / "a"))
    for (pa, a), (pb, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
        strict=True,
    ):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(tmp_path / "a"))
    assert hf.model_type == "qwen2" and hf.num_key_value_heads == 2
    assert LlamaConfig.from_dir(str(tmp_path / "a")) == model.config


def test_rope_theta_from_transformers5_rope_parameters():
    base = tiny_config().to_hf()
    del base["rope_theta"]
    base["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    assert LlamaConfig.from_hf(base).rope_theta == 100000.0


def test_sharded_index_loads(tmp_path):
    model = _random_model(tiny_config(), seed=4)
    save_hf(model, str(tmp_path / "one"))
    tensors = load_file(str(tmp_path / "one" / "model.safetensors"))
    names = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    os.makedirs(shard_dir)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(shard_dir / file))
        weight_map.update({n: file for n in part})
    with open(shard_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    os.link(tmp_path / "one" / "config.json", shard_dir / "config.json")
    ids = jnp.asarray(np.ones(MASK.shape, np.int32))
    a = load_hf(str(tmp_path / "one"))(ids, POSITIONS, MASK)
    b = load_hf(str(shard_dir))(ids, POSITIONS, MASK)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(str(tmp_path))
    model = _random_model(tiny_config())
    save_hf(model, str(tmp_path / "m"))
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(str(tmp_path / "m"))
    misshaped = dict(tensors)
    misshaped["model.norm.weight"] = np.ones(7, np.float32)
    save_file(misshaped, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight' has shape"):
        load_hf(str(tmp_path / "m"))
    bad = tiny_config().to_hf()
    bad["model_type"] = "gpt2"
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        LlamaConfig.from_hf(bad)
    del bad["vocab_size"]
    bad["model_type"] = "llama"
    with pytest.raises(ValueError, match="missing field 'vocab_size'"):
        LlamaConfig.from_hf(bad)


def test_unembedding_and_logits():
    tied = _random_model(tiny_config())
    np.testing.assert_array_equal(tied.unembedding(), np.asarray(tied.embed[...]).T)
    hidden = tied(jnp.zeros((1, 3), jnp.int32), jnp.arange(3)[None], jnp.ones((1, 3), bool))
    logits = tied.logits(hidden)
    assert logits.shape == (1, 3, 256) and logits.dtype == jnp.float32


@pytest.mark.slow  # three compiled forwards and backwards (about 30 s on 2 cores)
def test_scanned_and_rematerialised_forward_and_grads_equal_unrolled(tmp_path):
    config = CONFIGS["qwen2-like (biases, untied)"]
    save_hf(_random_model(config, seed=5), str(tmp_path))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=MASK.shape))

    def loss(model):
        hidden = model(ids, jnp.asarray(POSITIONS), jnp.asarray(MASK))
        return jnp.sum(jnp.where(MASK[..., None], model.logits(hidden), 0.0) ** 2) * 1e-3

    results = {}
    for scan, remat in ((False, False), (True, False), (True, "dots"), (False, True)):
        model = load_hf(str(tmp_path), scan_layers=scan, remat=remat)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        # Compare per HF tensor name so the stacked and unrolled layouts line up.
        exported = tmp_path / f"export-{scan}-{remat}"
        grad_model = load_hf(str(tmp_path), scan_layers=scan)
        nnx.update(grad_model, grads)
        save_hf(grad_model, str(exported))
        results[scan, remat] = (float(value), load_file(str(exported / "model.safetensors")))
    want_value, want_grads = results[False, False]
    for key, (value, grads) in results.items():
        np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=str(key))
        assert grads.keys() == want_grads.keys()
        for name in grads:
            np.testing.assert_allclose(
                grads[name], want_grads[name], rtol=1e-4, atol=1e-6, err_msg=f"{key} {name}"
            )
    scanned = load_hf(str(tmp_path), scan_layers=True)
    axes = nnx.to_flat_state(nnx.state(scanned, nnx.Param))
    assert all(v.get_metadata()["logical_axes"][0] == "layers" for p, v in axes if p[0] == "blocks")
    with pytest.raises(ValueError, match="remat 'sometimes'"):
        Llama(tiny_config(), rngs=nnx.Rngs(0), remat="sometimes")


def test_constrain_hook_sees_block_boundaries():
    seen = []

    def constrain(x, axes):
        seen.append((x.shape, axes))
        return x

    model = Llama(tiny_config(), rngs=nnx.Rngs(0), constrain=constrain)
    model(jnp.zeros(MASK.shape, jnp.int32), jnp.asarray(POSITIONS), jnp.asarray(MASK))
    assert seen == [((3, 8, 64), ("batch", "length", "embed"))] * 3  # embedding + 2 blocks
