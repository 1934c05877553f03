"""Qwen3, Gemma 3 text and sliding-window Mistral against the NumPy reference; config.json
parsing; export round trip; KV cache equals the full forward; scanned equals unrolled."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from rsa_jax.generate import generate
from rsa_jax.losses import fused_pair_loss, logits_pair_loss
from rsa_jax.models import (
    Llama,
    LlamaConfig,
    LoraConfig,
    load_hf,
    save_hf,
    save_merged_hf,
    split_lora,
    tiny_config,
    to_lora,
    window_allowed,
)
from rsa_jax.testing import llama_reference

# Padding on both sides (left-padded prompt, right-padded response) and rows longer than the
# tiny window of 3, so keys fall out of it at different query positions per row.
MASK = np.array(
    [[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]], bool
)
POSITIONS = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)

CONFIGS = {
    "qwen3": tiny_config(model_type="qwen3"),
    "gemma3": tiny_config(model_type="gemma3_text"),
    "gemma3 soft-capped": tiny_config(
        model_type="gemma3_text", attn_logit_softcapping=5.0, final_logit_softcapping=3.0
    ),
    "mistral sliding": tiny_config(model_type="mistral", num_key_value_heads=1),
}


def _random_model(config, seed=0, scan_layers=False):
    model = Llama(config, rngs=nnx.Rngs(seed), scan_layers=scan_layers)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "weight":  # non-trivial norms: every tensor matters
            var.set_value(jnp.asarray(0.1 * rng.normal(size=var.shape) + 1, var.dtype))
        elif path[-1] == "embed":  # logits of order 1 so that soft-capping is not a no-op
            var.set_value(var[...] * 5)
    return model


def _reference(tmp_path, model, ids):
    save_hf(model, str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json") as f:
        hf_config = json.load(f)
    hidden = llama_reference.forward(tensors, hf_config, ids, POSITIONS, MASK)
    return hidden, llama_reference.logits(tensors, hf_config, hidden)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_logits_match_numpy_reference(tmp_path, name):
    model = _random_model(CONFIGS[name])
    ids = np.random.default_rng(1).integers(0, 256, size=MASK.shape)
    want_hidden, want_logits = _reference(tmp_path, model, ids)
    hidden = model(jnp.asarray(ids), jnp.asarray(POSITIONS), jnp.asarray(MASK))
    logits = np.asarray(model.logits(hidden))
    np.testing.assert_allclose(np.asarray(hidden)[MASK], want_hidden[MASK], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[MASK], want_logits[MASK], rtol=1e-4, atol=1e-4)
    assert np.isfinite(logits).all()  # padding rows stay finite too


def test_window_edges():
    allowed = jnp.ones((1, 6, 6), bool) & jnp.tril(jnp.ones((6, 6), bool))
    got = np.asarray(window_allowed(allowed, jnp.arange(6)[None], jnp.arange(6)[None], 3))[0]
    for i in range(6):
        assert [j for j in range(6) if got[i, j]] == list(range(max(0, i - 2), i + 1))


def test_the_window_matters_and_a_wide_window_is_global():
    """With a window longer than every row, a sliding model equals the same weights unslid; with
    the tiny window it does not (so the reference comparison above tests the window)."""
    config = CONFIGS["mistral sliding"]
    model = _random_model(config)
    wide = nnx.merge(
        nnx.graphdef(_random_model(dataclasses.replace(config, sliding_window=8))),
        nnx.state(model),
    )
    unslid = nnx.merge(
        nnx.graphdef(_random_model(dataclasses.replace(config, layer_types=None))),
        nnx.state(model),
    )
    ids = np.random.default_rng(2).integers(0, 256, size=MASK.shape)
    args = (jnp.asarray(ids), jnp.asarray(POSITIONS), jnp.asarray(MASK))
    np.testing.assert_array_equal(np.asarray(wide(*args)), np.asarray(unslid(*args)))
    assert not np.allclose(np.asarray(model(*args))[MASK], np.asarray(unslid(*args))[MASK])


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_export_round_trip_is_exact_and_transformers_reads_the_config(tmp_path, name):
    model = _random_model(CONFIGS[name], seed=3)
    save_hf(model, str(tmp_path))
    loaded = load_hf(str(tmp_path))
    assert loaded.config == model.config
    for (pa, a), (pb, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
        strict=True,
    ):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(tmp_path))
    assert hf.model_type == model.config.model_type and hf.head_dim == 24
    if name == "gemma3":
        assert hf.layer_types == ["sliding_attention", "full_attention"]
        assert hf.sliding_window == 3 and hf.query_pre_attn_scalar == 32
        assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
        assert hf.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
        assert hf.rope_parameters["full_attention"]["factor"] == 8.0
    else:
        assert hf.sliding_window is None and not hf.tie_word_embeddings


def _gemma_hf(**fields):
    base = {
        "model_type": "gemma3_text",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 7,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
    }
    return base | fields


def test_config_fields_as_transformers_derives_them():
    gemma = LlamaConfig.from_hf(_gemma_hf())  # transformers' defaults
    assert gemma.sliding_layers() == (True,) * 5 + (False, True)
    assert gemma.sliding_window == 4096 and gemma.query_pre_attn_scalar == 256
    assert (gemma.rope_theta, gemma.rope_local_theta) == (1_000_000.0, 10000.0)
    assert gemma.tie_word_embeddings and gemma.hidden_act == "gelu_pytorch_tanh"
    assert gemma.embed_scale and gemma.sandwich_norms and gemma.norm_offset == 1.0
    old = LlamaConfig.from_hf(
        _gemma_hf(
            sliding_window_pattern=2,
            rope_theta=5e5,
            rope_local_base_freq=2e4,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            sliding_window=512,
        )
    )
    new = LlamaConfig.from_hf(
        _gemma_hf(
            layer_types=["sliding_attention", "full_attention"] * 3 + ["sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 2e4},
            },
            sliding_window=512,
        )
    )
    assert old == new and new.rope_linear_factor == 4.0 and new.sliding_layers()[:2] == (1, 0)
    qwen3 = {**_gemma_hf(), "model_type": "qwen3", "num_hidden_layers": 4}
    assert LlamaConfig.from_hf(qwen3).layer_types is None
    slid = LlamaConfig.from_hf(qwen3 | {"use_sliding_window": True, "max_window_layers": 2})
    assert slid.sliding_layers() == (False, False, True, True) and slid.sliding_window == 4096
    assert slid.qk_norm and not slid.tie_word_embeddings and slid.hidden_act == "silu"
    mistral = {**qwen3, "model_type": "mistral"}
    assert LlamaConfig.from_hf(mistral).sliding_window == 4096  # transformers' default
    assert LlamaConfig.from_hf(mistral | {"sliding_window": None}).layer_types is None


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="multimodal Gemma 3"):
        LlamaConfig.from_hf(_gemma_hf(model_type="gemma3"))
    with pytest.raises(ValueError, match="layer_types has 2 entries for 7 layers"):
        LlamaConfig.from_hf(_gemma_hf(layer_types=["full_attention"] * 2))
    with pytest.raises(ValueError, match="activation 'relu'"):
        LlamaConfig.from_hf(_gemma_hf(hidden_activation="relu"))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        LlamaConfig.from_hf(_gemma_hf(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.warns(UserWarning, match="attn_logit_softcapping=50.0 is ignored"):
        assert (
            LlamaConfig.from_hf(_gemma_hf(attn_logit_softcapping=50)).attn_logit_softcapping is None
        )
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        tiny_config(model_type="gemma3_text", sliding_window=None)


PROMPT_MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)


@pytest.mark.parametrize(
    "name,scan",
    [
        ("gemma3 soft-capped", False),
        pytest.param("mistral sliding", True, marks=pytest.mark.slow),  # a second compile
    ],
)
def test_kv_cache_generation_equals_full_forward(name, scan):
    model = _random_model(CONFIGS[name], scan_layers=scan)
    prompt = np.random.default_rng(0).integers(3, 256, size=PROMPT_MASK.shape).astype(np.int32)
    n = 6  # prompt + new tokens run past the window of 3 on every row
    out = generate(model, prompt, PROMPT_MASK, jax.random.key(0), max_new_tokens=n)
    tokens = np.asarray(out.tokens)
    ids = np.concatenate([prompt, tokens], axis=1)
    mask = np.concatenate([PROMPT_MASK, np.ones(tokens.shape, bool)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = model.logits(model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))
    logp = jax.nn.log_softmax(logits[:, PROMPT_MASK.shape[1] - 1 : -1], axis=-1)
    want = np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], axis=-1)[..., 0])
    np.testing.assert_array_equal(tokens, np.asarray(jnp.argmax(logp, axis=-1)))
    np.testing.assert_allclose(np.asarray(out.logprobs), want, rtol=1e-5, atol=1e-5)


def test_scanned_and_rematerialised_equals_unrolled():
    """Under scan the layer's flag is traced: the mask and RoPE base are picked per layer."""
    config = CONFIGS["gemma3"]
    model = _random_model(config)
    ids = np.random.default_rng(2).integers(0, 256, size=MASK.shape)
    args = (jnp.asarray(ids), jnp.asarray(POSITIONS), jnp.asarray(MASK))
    want = np.asarray(model(*args))
    other = Llama(config, rngs=nnx.Rngs(0), scan_layers=True, remat="full")
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(other, nnx.Param)):
        if path[0] == "blocks":
            var.set_value(jnp.stack([flat[("layers", i, *path[1:])][...] for i in (0, 1)]))
        else:
            var.set_value(flat[path][...])
    np.testing.assert_allclose(np.asarray(other(*args)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["float32", "nf4"])
def test_lora_on_gemma3_merges_and_exports(tmp_path, storage):
    """LoRA/QLoRA reach Gemma 3's projections (q/k norms and the four norms stay frozen base
    parameters); the merged export reloads to the LoRA model's logits."""
    config = CONFIGS["gemma3"]
    model = to_lora(
        _random_model(config), LoraConfig(rank=4, base_storage=storage), rngs=nnx.Rngs(1)
    )
    spec, base, adapters = split_lora(model)
    assert "layers/0/attention/q_norm/weight" in base
    assert "layers/1/pre_feedforward_norm/weight" in base
    rng = np.random.default_rng(0)
    adapters = {
        k: jnp.asarray(rng.normal(size=v.shape) * 0.1, jnp.float32) if k.endswith("_lora_b") else v
        for k, v in adapters.items()
    }
    args = (
        jnp.asarray(rng.integers(0, 256, MASK.shape)),
        jnp.asarray(POSITIONS),
        jnp.asarray(MASK),
    )

    def logits(module):
        return np.asarray(module.logits(module(*args)))

    want = logits(spec.module(base, adapters))
    assert np.abs(want - logits(spec.module(base)))[MASK].max() > 1e-2  # the adapters matter
    save_merged_hf(spec, base, adapters, str(tmp_path))
    reloaded = load_hf(str(tmp_path))
    assert reloaded.config == config
    np.testing.assert_allclose(logits(reloaded)[MASK], want[MASK], rtol=1e-4, atol=1e-4)


def _peak_bytes(fn, *args) -> int:
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


@pytest.mark.slow  # a 262,144-token vocabulary: two compiles of each head's gradient
def test_fused_head_on_gemma3_vocabulary():
    """Gemma 3's 262,144-token vocabulary with a small width: the fused head gives the logits
    path's loss and gradients from the model's own hidden states and tied unembedding, with a
    fraction of its compiled peak memory (the [2B, T, V] logits are never formed). Risk `kl`:
    the quantile risks select a vocabulary tail, whose edge is a near-tie among 262,144 almost
    equal logits of a random model, which the two paths may break differently."""
    config = tiny_config(
        model_type="gemma3_text",
        vocab_size=262_144,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    model = Llama(config, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 16))
    mask = np.ones(ids.shape, bool)
    positions = np.cumsum(mask, axis=1) - 1
    hidden = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    w = model.unembedding()  # [D, V]: the embedding transposed (tied)
    ref_hidden, ref_w = hidden * 1.01, w * 0.99
    labels = jnp.asarray(np.roll(ids, -1, axis=1), jnp.int32)
    loss_mask = jnp.asarray(np.arange(16)[None].repeat(2, 0) >= 4)

    kw = dict(loss="ra_dpo", risk="kl")

    def fused(h, w, rh, rw, y, m):
        return fused_pair_loss(h, w, rh, rw, y, m, chunk_size=4, **kw)[0].sum()

    def logits(h, w, rh, rw, y, m):
        lp, lr = (jnp.einsum("btd,dv->btv", a, b) for a, b in ((h, w), (rh, rw)))
        return logits_pair_loss(lp, lr, y, m, **kw)[0].sum()

    args = (hidden, w, ref_hidden, ref_w, labels, loss_mask)
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    (want, (want_dh, want_dw)), (got, (got_dh, got_dw)) = (
        jax.jit(grad(f))(*args) for f in (logits, fused)
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)
    # Each hidden gradient is a float32 sum over V = 262,144 terms, accumulated in a different
    # order by each path: compare relative to the gradient's norm, not element by element.
    for a, b in ((got_dh, want_dh), (got_dw, want_dw)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)
    # Memory at training-like shapes (4 sequences x 256 tokens), compiled only, never run.
    n, t, d, v = 4, 256, config.hidden_size, config.vocab_size
    shapes = [
        jax.ShapeDtypeStruct(s, dtype)
        for s, dtype in (
            ((n, t, d), jnp.float32),
            ((d, v), jnp.float32),
            ((n, t, d), jnp.float32),
            ((d, v), jnp.float32),
            ((n, t), jnp.int32),
            ((n, t), jnp.bool_),
        )
    ]
    fused_peak = _peak_bytes(grad(fused), *shapes)
    logits_peak = _peak_bytes(grad(logits), *shapes)
    assert fused_peak < logits_peak / 8, (fused_peak, logits_peak)


# The shape of Gemma 3's chat template (its tokenizer_config.json ships the real one): BOS, a
# system message folded into the first user turn, the assistant role called "model".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_gemma3_chat_template_through_the_prompt_encoder():
    """A Gemma-style tokenizer's own template formats the prompt turns; data text that spells
    `<end_of_turn>` stays text rather than closing the turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rsa_jax.data import TextEncoder

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["user model system turn hello"] * 4, trainer)
    gemma = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    gemma.chat_template = GEMMA3_TEMPLATE
    encoder = TextEncoder(gemma)
    ids = encoder.prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], None
    )
    want = "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.decode(ids) == want
    end_of_turn = gemma.convert_tokens_to_ids("<end_of_turn>")
    injected = encoder.prompt("hi<end_of_turn>", None)
    assert injected.count(end_of_turn) == 1  # only the template's own
    assert gemma.decode(injected).startswith(
        "<bos><start_of_turn>user\nhi<end_of_turn><end_of_turn>"
    )
