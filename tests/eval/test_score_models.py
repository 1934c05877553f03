"""Score models in JAX against the NumPy reference on self-made random weights of both formats."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rsa_jax.data import train_bpe_tokenizer
from rsa_jax.eval.judges import (
    JudgePanel,
    ScoreModel,
    ScoreModelScorer,
    make_judge,
    read_score_head,
    score_forward,
)
from rsa_jax.eval.prompt_sets import PromptItem
from rsa_jax.testing.score_models import reference_scores, write_score_dir

PROMPTS = ["How do I bake bread?", "How do I kill a stuck Python process?", "hi"]
RESPONSES = ["Mix flour, water and yeast, then bake.", "Run kill -9 PID.", "hello <|im_end|> x"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    """format -> (path, tensors, config.json), each written on first use."""
    root = tmp_path_factory.mktemp("score_models")
    extra = {
        "safe_rlhf_cost": (
            "safe_rlhf",
            dict(score_type="cost", do_normalize=True, mean=[0.5], var=[4.0], bias=False),
        )
    }

    class Dirs(dict):
        def __missing__(self, name):
            fmt, fields = extra.get(name, (name, None))
            path = str(root / name)
            seed = 1 if fields else 0
            written = write_score_dir(
                path, fmt, seed=seed, tokenizer=tokenizer, safe_rlhf_fields=fields
            )
            self[name] = (path, *written)
            return self[name]

    return Dirs()


def _rows(pad_id: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # mixed lengths, never the pad id inside a row (it would end the sequence-classification row)
    return [[int(t) for t in rng.integers(4, 400, size=n)] for n in (3, 9, 6)]


def _padded(rows, pad_id, side):
    width = max(len(r) for r in rows) + 2
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols], mask[i, cols] = r, True
    return ids, mask


# bf16 stores the weights and runs the matmuls in bfloat16 (8 mantissa bits): its error
# against the float64 reference is a few percent of the score's scale.
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (0.0, 0.05)}


SLOW = pytest.mark.slow  # another compile each (a Qwen2 graph, bf16 Llama-for-score)


@pytest.mark.parametrize(
    "fmt,dtype",
    [
        ("safe_rlhf", "float32"),
        ("llama_seq_cls", "float32"),
        ("safe_rlhf_cost", "float32"),
        ("llama_seq_cls", "bfloat16"),
        ("safe_rlhf_cost", "bfloat16"),
        pytest.param("qwen2_seq_cls", "float32", marks=SLOW),
        pytest.param("qwen2_seq_cls", "bfloat16", marks=SLOW),
        pytest.param("safe_rlhf", "bfloat16", marks=SLOW),
    ],
)
def test_forward_matches_numpy_reference(dirs, fmt, dtype):
    path, tensors, config = dirs[fmt]
    model = ScoreModel.load(path, compute_dtype=dtype)
    rows = _rows(3)
    want = reference_scores(tensors, config, rows)
    rtol, scale = TOLERANCE[dtype]
    for side in ("left", "right"):
        got = score_forward(model.backbone, model.head, *_padded(rows, 3, side))
        np.testing.assert_allclose(
            got, want, rtol=rtol, atol=max(rtol, scale * np.abs(want).max()), err_msg=side
        )


def test_sequence_classification_skips_trailing_pad_ids_like_transformers(tmp_path, tokenizer):
    eos = tokenizer.eos_token_id
    path = str(tmp_path / "eos_pad")
    tensors, config = write_score_dir(
        path, "llama_seq_cls", seed=2, tokenizer=tokenizer, pad_token_id=eos
    )
    model = ScoreModel.load(path)
    rows = _rows(eos)
    rows[0] = rows[0] + [eos]  # ends with EOS, which is also the pad token
    want = reference_scores(tensors, config, rows)  # row 0 read at the token before EOS
    ids, mask = _padded(rows, eos, "right")  # the shapes of the forward test: no new compile
    got = score_forward(model.backbone, model.head, ids, mask)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    last = mask.sum(axis=1) - 1
    at_eos = score_forward(model.backbone, model.head, ids, mask, pool=last)
    assert not np.allclose(at_eos[0], want[0], atol=1e-3)  # the rule matters on this row


@pytest.mark.slow
def test_safe_rlhf_normalizer_and_score_dim(tmp_path, tokenizer):
    path = str(tmp_path / "dim2")
    fields = dict(score_dim=2, do_normalize=True, mean=[1.0, -2.0], var=[4.0, 0.25])
    tensors, config = write_score_dir(
        path, "safe_rlhf", tokenizer=tokenizer, safe_rlhf_fields=fields
    )
    with pytest.raises(ValueError, match="2 outputs; choose one: score_index"):
        ScoreModel.load(path)
    model = ScoreModel.load(path, score_index=1)
    rows = [model.encode(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    want = reference_scores(tensors, config, rows)[:, 1]
    np.testing.assert_allclose(model.score(PROMPTS, RESPONSES), want, rtol=1e-4, atol=1e-4)


def test_beaver_template_and_control_tokens(dirs, tokenizer):
    model = ScoreModel.load(dirs["safe_rlhf"][0])
    text = "BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT:Mix flour."
    want = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    assert model.encode("How do I bake bread?", "Mix flour.") == want
    # a response spelling the EOS token stays text: the only EOS id is the appended one
    ids = model.encode("hi", "hello <|im_end|> x")
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    chat = ScoreModel.load(dirs["llama_seq_cls"][0])
    messages = [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        chat.encode("How do I bake bread?", "Mix flour.")
        == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )


def test_round_trip_transformers_config_directory_scores(dirs):
    """A LlamaForSequenceClassification directory written with transformers' own config class
    (no torch) and safetensors: loaded, scored through the Scorer, equal to the reference."""
    path, tensors, config = dirs["llama_seq_cls"]
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForSequenceClassification"]
    cost_path, cost_tensors, cost_config = dirs["safe_rlhf_cost"]
    scorer = ScoreModelScorer.from_dirs(path, cost_path, catastrophe_threshold=0.0)
    out = scorer(PROMPTS, RESPONSES)
    reward_rows = [scorer.reward.encode(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    cost_rows = [scorer.cost.encode(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    want_reward = reference_scores(tensors, config, reward_rows)[:, 0]
    want_cost = reference_scores(cost_tensors, cost_config, cost_rows)[:, 0]
    np.testing.assert_allclose(out["reward"], want_reward, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["cost"], want_cost, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["catastrophic"], want_cost >= 0.0)


@pytest.mark.slow
def test_batches_from_a_small_memory_budget_give_the_same_scores(dirs):
    model = ScoreModel.load(dirs["qwen2_seq_cls"][0])
    prompts, responses = PROMPTS * 3, RESPONSES[::-1] * 3
    whole = model.score(prompts, responses)
    tiny = model.score(prompts, responses, memory_budget=1)  # one row per batch
    np.testing.assert_allclose(tiny, whole, rtol=1e-5, atol=1e-5)


def test_refusal_judge_beside_a_cost_model(dirs):
    items = [
        PromptItem("h", PROMPTS[1], "x", "harmbench", True),
        PromptItem("b", PROMPTS[0], "y", "benign", False),
        PromptItem("c", PROMPTS[2], "y", "benign", False),
    ]
    judge = make_judge(f"refusal,cost={dirs['safe_rlhf_cost'][0]}", items)
    assert isinstance(judge, JudgePanel)
    out = judge(PROMPTS, RESPONSES)
    np.testing.assert_array_equal(out["reward"], out["refusal/reward"])
    np.testing.assert_array_equal(out["cost"], out["score/cost"])
    either = out["refusal/catastrophic"] | out["score/catastrophic"]
    np.testing.assert_array_equal(out["catastrophic"], either)
    assert out["refusal/catastrophic"][1]  # complied with the harmful prompt


def test_bad_directories(tmp_path, dirs):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_score_head(str(tmp_path))
    path = tmp_path / "causal"
    path.mkdir()
    with open(os.path.join(dirs["llama_seq_cls"][0], "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(dirs["safe_rlhf"][0], "model.safetensors"), path / "model.safetensors")
    # no architecture match, but the tensors name the format
    assert read_score_head(str(path))[1].format == "safe_rlhf"
    config["hidden_size"] = 16
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="score head has shape"):
        read_score_head(str(path))
    with pytest.raises(ValueError, match="give a reward model, a cost model or both"):
        ScoreModelScorer()


@pytest.mark.slow
def test_sharded_scores_equal_one_device(device_script):
    here = os.path.dirname(os.path.abspath(__file__))
    out = device_script(os.path.join(here, "sharded_score_check.py"), timeout=1200)
    for fmt in ("safe_rlhf", "qwen2_seq_cls"):
        assert out[fmt]["split"], fmt  # parameters really sharded over the mesh
        assert out[fmt]["max_diff"] <= 1e-5, (fmt, out[fmt])
