"""Text in, text out: `generate_text` against the by-hand pipeline it replaces (format,
tokenize, left-pad, mask, EOS), its batch independence and streaming; `rsa-jax generate` on a
tiny run (its own template and compute dtype, --stage, JSON Lines) and on the bundled model."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from rsa_jax.cli import build_parser, main
from rsa_jax.data import TextEncoder, train_bpe_tokenizer, write_toy_data
from rsa_jax.eval import load_model, source_template
from rsa_jax.generate import (
    BATCH_SIZE,
    MAX_NEW_TOKENS,
    TEMPERATURE,
    TOP_P,
    generate,
    generate_text,
)
from rsa_jax.models import Llama, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMOLLM2 = os.path.join(ROOT, "artifacts", "smollm2-135m")
TEMPLATE = "Q: {prompt} A:"
PROMPTS = ["safe help please", "a much longer question about the weather today", "hi"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_bpe_tokenizer()
    return Llama(tiny_config(vocab_size=len(tokenizer)), rngs=nnx.Rngs(3)), tokenizer


def _by_hand(model, tokenizer, prompt, max_new_tokens, eos):
    """What a user wrote before generate_text: format, tokenize, left-pad, mask, generate."""
    ids = np.asarray(tokenizer(TEMPLATE.format(prompt=prompt))["input_ids"], np.int32)[None]
    left = 64 - ids.shape[1]  # left padding to one width: one compile for every prompt
    out = generate(
        model,
        np.pad(ids, ((0, 0), (left, 0))),
        np.pad(np.ones_like(ids, bool), ((0, 0), (left, 0))),
        jax.random.key(0),
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        pad_id=0,
    )
    return np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist()


def test_greedy_text_equals_the_by_hand_pipeline(tiny):
    model, tokenizer = tiny
    done = generate_text(
        model, tokenizer, PROMPTS, template=TEMPLATE, temperature=0, max_new_tokens=6
    )
    assert [(c.prompt_index, c.sample_index) for c in done] == [(0, 0), (1, 0), (2, 0)]
    for c in done:
        want = _by_hand(model, tokenizer, PROMPTS[c.prompt_index], 6, (tokenizer.eos_token_id,))
        assert c.tokens == want and c.prompt == PROMPTS[c.prompt_index]
        assert c.finished == (want[-1] == tokenizer.eos_token_id)
        assert c.text == tokenizer.decode(want[: len(want) - c.finished], skip_special_tokens=True)


def test_an_end_id_stops_the_answer_and_is_not_in_the_text(tiny):
    model, tokenizer = tiny
    [free] = generate_text(model, tokenizer, "hi", template=TEMPLATE, temperature=0)
    first = free.tokens[0]
    [stopped] = generate_text(
        model, tokenizer, "hi", template=TEMPLATE, temperature=0, eos_ids=(first, 10**6)
    )
    assert stopped.tokens == [first] and stopped.finished and stopped.text == ""


@pytest.mark.slow  # samples at several batch sizes (about 25 s on 2 cores)
def test_samples_do_not_depend_on_the_batch_and_stream_in_order(tiny):
    model, tokenizer = tiny
    kwargs = dict(template=TEMPLATE, n=3, max_new_tokens=5, seed=7, temperature=1.0, top_p=0.9)
    streamed = []
    whole = generate_text(model, tokenizer, PROMPTS, on_completion=streamed.append, **kwargs)
    assert streamed == whole and len(whole) == 9
    split = generate_text(model, tokenizer, PROMPTS, batch_size=4, **kwargs)
    assert [c.tokens for c in split] == [c.tokens for c in whole]
    other_seed = generate_text(model, tokenizer, PROMPTS, **{**kwargs, "seed": 8})
    assert [c.tokens for c in other_seed] != [c.tokens for c in whole]


def test_chat_template_when_no_template(tiny):
    """Without a template the prompt goes through the chat template, as in training."""
    from rsa_jax.generate import encode_prompt

    _, tokenizer = tiny
    encoder = TextEncoder(tokenizer)
    assert encode_prompt(encoder, "hi", None, 1024).tolist() == encoder.prompt("hi", None)
    assert encode_prompt(encoder, "hi", TEMPLATE, 3).tolist() == encoder.prompt("hi", TEMPLATE)[-3:]
    with pytest.raises(ValueError, match="must contain"):
        encode_prompt(encoder, "hi", "no field", 8)


def test_cli_help_states_generate_texts_defaults():
    """The CLI leaves its sampling defaults to generate_text; its help repeats them."""
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    helps = {a.dest: a.help for a in sub._actions}
    for dest, value in [
        ("temperature", TEMPERATURE),
        ("top_p", TOP_P),
        ("max_new_tokens", MAX_NEW_TOKENS),
        ("batch_size", BATCH_SIZE),
    ]:
        assert re.search(rf"default {value}\b", helps[dest]), (dest, helps[dest])


@pytest.mark.slow  # trains a tiny run first: about a minute on 2 cores
def test_generate_command_on_a_tiny_run(tmp_path, capsys):
    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=16)
    run = str(tmp_path / "run")
    overrides = [f"data.path={data}", f"train.run_dir={run}", "stages.0.steps=2"]
    overrides += ["stages.1.steps=1", "checkpoint.async_save=false", "model.compute_dtype=bfloat16"]
    overrides += ["data.template='Question: {prompt} Answer:'"]
    assert main(["train", TINY, *overrides]) == 0
    # The run's own template and compute dtype, unless told otherwise.
    assert source_template(run) == "Question: {prompt} Answer:"
    assert source_template(run, "X {prompt}") == "X {prompt}"
    assert source_template(SMOLLM2, None, "task {prompt}") == "task {prompt}"
    model, tokenizer = load_model(run)
    assert model.compute_dtype == np.dtype("bfloat16")
    assert load_model(run, compute_dtype="float32")[0].compute_dtype == np.dtype("float32")
    out = str(tmp_path / "answers.jsonl")
    args = ["generate", run, "--prompt", "safe help", "--prompt", "hi", "-n", "2"]
    args += ["--max-new-tokens", "4", "--seed", "3", "--out", out]
    assert main(args) == 0
    rows = [json.loads(line) for line in open(out)]
    want = generate_text(
        model,
        tokenizer,
        ["safe help", "hi"],
        template="Question: {prompt} Answer:",
        n=2,
        max_new_tokens=4,
        seed=3,
    )
    assert [(r["prompt_index"], r["sample"], r["text"]) for r in rows] == [
        (c.prompt_index, c.sample_index, c.text) for c in want
    ]
    # --stage 0: the stage-0 policy, greedy, to stdout as text.
    capsys.readouterr()
    assert main(["generate", run, "--stage", "0", "--prompt", "hi", "--temperature", "0"]) == 0
    stage0, _ = load_model(run, stage=0)
    [c] = generate_text(
        stage0, tokenizer, "hi", template="Question: {prompt} Answer:", temperature=0
    )
    printed = capsys.readouterr().out
    assert printed == c.text + ("\n" if c.finished else " [max tokens]\n")
    assert main(["generate", run, "--prompt", "hi", "--top-p", "0"]) == 2


@pytest.mark.slow
def test_generate_command_answers_on_the_bundled_model(capsys):
    """One command, the bundled SmolLM2-135M-Instruct, its chat template: a real answer."""
    if not os.path.isfile(os.path.join(SMOLLM2, "model.safetensors")):
        pytest.fail("artifacts/smollm2-135m is missing (make model builds it)")
    args = ["generate", SMOLLM2, "--prompt", "What is the capital of France?"]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out
