"""A QLoRA result says which model it is (issue 25, item 1): the trained model (the quantized
base dequantized, plus the adapters) and the adapters merged into a float base the user names
(PEFT's merge_and_unload) are two different exports, and the PEFT export records its base."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsa_jax.models import (
    Llama,
    LoraConfig,
    load_hf,
    merge_into_base,
    save_hf,
    save_merged_hf,
    save_peft,
    split_lora,
    tiny_config,
    to_lora,
)
from rsa_jax.models._lora import LORA_A, LORA_B


def _random_model(seed: int = 0, **config) -> Llama:
    """A tiny Llama with random weights, built from shapes (no per-parameter init compiles)."""
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: Llama(tiny_config(**config), rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), state)
    return nnx.merge(graphdef, state)


def _params(path) -> dict:
    model = load_hf(str(path))
    return {
        "/".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    save_hf(_random_model(), str(root / "base"))
    lora = LoraConfig(rank=2, alpha=4.0, base_storage="nf4", block_size=16)
    spec, base, adapters = split_lora(to_lora(load_hf(str(root / "base")), lora, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(3)
    adapters = {
        k: jnp.asarray(0.05 * rng.standard_normal(v.shape), v.dtype) for k, v in adapters.items()
    }
    return root, spec, base, adapters


def test_the_trained_model_and_the_float_base_merge_are_two_models(qlora):
    root, spec, base, adapters = qlora
    save_merged_hf(spec, base, adapters, str(root / "trained"))
    merge_into_base(spec, adapters, str(root / "base"), str(root / "on_float"))
    trained, on_float, original = (_params(root / n) for n in ("trained", "on_float", "base"))
    key = "layers/0/attention/q"
    # On the float base: exactly W + (alpha / r) A B; the embeddings are the float base's.
    a = np.asarray(adapters[key + LORA_A], np.float32)
    b = np.asarray(adapters[key + LORA_B], np.float32)
    expected = original[key] + np.float32(spec.lora.scale) * np.tensordot(a, b, axes=1)
    np.testing.assert_allclose(on_float[key], expected, rtol=0, atol=1e-6)
    # The trained model carries the nf4 rounding of the base, far above the adapters' effect.
    rounding = np.abs(trained[key] - on_float[key]).max()
    assert rounding > 1e-3, rounding


def test_a_base_of_another_shape_is_refused(qlora, tmp_path):
    _, spec, _, adapters = qlora
    other = _random_model(hidden_size=32, intermediate_size=64)
    save_hf(other, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not the base these adapters were trained on"):
        merge_into_base(spec, adapters, str(tmp_path / "other"), str(tmp_path / "out"))


def test_the_peft_export_records_its_quantized_base(qlora, tmp_path):
    _, spec, _, adapters = qlora
    save_peft(spec, adapters, str(tmp_path / "peft"), base_model_name_or_path="/models/base")
    record = json.loads((tmp_path / "peft" / "rsa_jax_base.json").read_text())
    assert record["base_model_name_or_path"] == "/models/base"
    assert record["base_storage"] == "nf4" and record["block_size"] == 16
    assert "another model than the one trained" in record["note"]
