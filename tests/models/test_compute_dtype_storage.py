"""`store_in_compute_dtype`: evaluation stores the weights the model casts at every use in its
compute dtype. Same outputs bit for bit, narrower storage, norms (read in float32) untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsa_jax.generate import generate
from rsa_jax.models import Llama, cast_at_use, store_in_compute_dtype, tiny_config

# The cases the default suite runs (tests/conftest.py marks the others slow).
DEFAULT_CASES = {
    "test_stored_in_compute_dtype_gives_the_same_bits": ["qwen2-biases", "gemma3-scaled-embedding"]
}

CASES = {
    "llama-scanned-tied": dict(config=dict(), scan=True),
    "llama-unrolled-head": dict(config=dict(tie_word_embeddings=False), scan=False),
    "qwen2-biases": dict(config=dict(attention_bias=True, tie_word_embeddings=False), scan=True),
    "gemma3-scaled-embedding": dict(config=dict(model_type="gemma3_text"), scan=True),
}


def _model(case, compute_dtype):
    spec = CASES[case]
    config = tiny_config(**spec["config"])
    return Llama(config, rngs=nnx.Rngs(3), compute_dtype=compute_dtype, scan_layers=spec["scan"])


def _outputs(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, size=(3, 7)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[0, :2] = False  # left padding
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    hidden = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    logits = model.logits(hidden)
    out = generate(
        model, ids, mask, jax.random.key(1), max_new_tokens=5, eos_ids=(2,), temperature=1.0
    )
    return [np.asarray(a) for a in (logits, out.tokens, out.logprobs, out.lengths)]


@pytest.mark.parametrize("case", list(CASES))
def test_stored_in_compute_dtype_gives_the_same_bits(case):
    wide = _model(case, jnp.bfloat16)
    want = _outputs(wide)
    narrow = store_in_compute_dtype(_model(case, jnp.bfloat16))
    got = _outputs(narrow)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    dtypes = {
        "/".join(map(str, path)): var.get_value().dtype
        for path, var in nnx.to_flat_state(nnx.state(narrow, nnx.Param))
    }
    scaled = CASES[case]["config"].get("model_type") == "gemma3_text"
    for path, dtype in dtypes.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf in ("q", "k", "v", "o", "gate", "up", "down", "lm_head") or "_bias" in leaf:
            assert dtype == jnp.bfloat16, path
        elif leaf == "embed":
            assert dtype == (jnp.float32 if scaled else jnp.bfloat16), path
        else:  # norm weights
            assert leaf == "weight" and dtype == jnp.float32, path
        assert cast_at_use(path, narrow.config) == (dtype == jnp.bfloat16), path


def test_float32_compute_keeps_every_parameter():
    model = _model("llama-scanned-tied", jnp.float32)
    before = nnx.state(model, nnx.Param)
    store_in_compute_dtype(model)
    after = nnx.state(model, nnx.Param)
    for (_, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True):
        assert a.get_value() is b.get_value()
