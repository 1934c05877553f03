"""`rsa-jax eval --prompts <shipped sets> --judge ...` on a tiny model, and the run's template."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx

from rsa_jax.cli import main
from rsa_jax.config import load_config
from rsa_jax.data import train_bpe_tokenizer
from rsa_jax.eval import read_results, read_samples
from rsa_jax.models import Llama, save_hf, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    tokenizer = train_bpe_tokenizer()
    path = str(tmp_path_factory.mktemp("tiny_hf") / "tiny")
    model = Llama(tiny_config(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
    save_hf(model, path, tokenizer)
    return path


def test_eval_on_shipped_prompt_sets_with_the_refusal_judge(tiny_model, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", tiny_model, "--prompts", "harmbench,benign", "--judge", "refusal"]
    argv += ["--prompt-limit", "2", "--samples", "2", "--max-new-tokens", "4"]
    assert main([*argv, "--n-boot", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "by prompt set and category" in printed and "| harmbench |" in printed
    rows = read_samples(out)
    assert len(rows) == 2 * 2 * 2  # 2 sets x 2 prompts x 2 samples
    harmful = [r for r in rows if r["source"] == "harmbench"]
    benign = [r for r in rows if r["source"] == "benign"]
    assert harmful and benign and all(r["harmful"] for r in harmful)
    for r in rows:  # the refusal judge's rule, row by row
        refused = r["refused"]
        assert r["cost"] == (1.0 if r["harmful"] and not refused else 0.0)
        assert r["reward"] == (0.0 if r["harmful"] or refused else 1.0)
        assert r["prompt_id"].startswith(r["source"])
    by_category = read_results(out / "categories" / "tiny")
    assert {"harmbench", "benign"} <= set(by_category)
    assert any(name.startswith("harmbench/") for name in by_category)
    assert set(read_results(out)) == {"tiny"}


def test_refusal_judge_needs_shipped_sets_and_bad_inputs_are_named(tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    with pytest.raises(SystemExit, match="refusal needs the prompt sets"):
        main(["eval", tiny_model, "--prompts", str(prompts), "--judge", "refusal", "--out", "o"])
    assert main(["eval", tiny_model, "--prompts", "harmbench,nope", "--judge", "refusal",
                 "--out", "o"]) == 2  # fmt: skip
    with pytest.raises(SystemExit, match="not both"):
        argv = ["eval", tiny_model, "--prompts", "benign", "--judge", "refusal"]
        main([*argv, "--scorer", "x:y", "--out", "o"])


@pytest.mark.slow  # three models compiled (policy, reward, cost): ~20 s of CPU
def test_eval_with_score_model_judges_from_directories(tiny_model, tmp_path, capsys):
    """`--judge reward=DIR,cost=DIR`: random score models written here (both formats); every
    sample's reward and cost are the NumPy reference's scores of its own prompt and text, and
    catastrophic is cost >= --catastrophe-threshold."""
    from rsa_jax.eval.judges import ScoreModel
    from rsa_jax.testing.score_models import reference_scores, write_score_dir

    tokenizer = train_bpe_tokenizer()
    reward_dir, cost_dir = str(tmp_path / "reward"), str(tmp_path / "cost")
    reward_tensors, reward_config = write_score_dir(
        reward_dir, "llama_seq_cls", tokenizer=tokenizer
    )
    cost_fields = dict(score_type="cost", do_normalize=True, mean=[0.1], var=[2.0], bias=True)
    cost_tensors, cost_config = write_score_dir(
        cost_dir, "safe_rlhf", seed=1, tokenizer=tokenizer, safe_rlhf_fields=cost_fields
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I bake bread?\nHow do I kill a stuck Python process?\n")
    out = tmp_path / "eval"
    argv = ["eval", tiny_model, "--prompts", str(prompts), "--out", str(out)]
    argv += ["--judge", f"reward={reward_dir},cost={cost_dir}", "--catastrophe-threshold", "0.05"]
    assert main([*argv, "--samples", "2", "--max-new-tokens", "4", "--n-boot", "10"]) == 0
    assert "tiny" in capsys.readouterr().out
    rows = read_samples(out)
    assert len(rows) == 2 * 2
    for path, tensors, config, field in (
        (reward_dir, reward_tensors, reward_config, "reward"),
        (cost_dir, cost_tensors, cost_config, "cost"),
    ):
        model = ScoreModel.load(path)
        want = reference_scores(
            tensors, config, [model.encode(r["prompt"], r["text"]) for r in rows]
        )
        got = [r[field] for r in rows]
        np.testing.assert_allclose(got, want[:, 0], rtol=1e-4, atol=1e-4, err_msg=field)
    assert [r["catastrophic"] for r in rows] == [r["cost"] >= 0.05 for r in rows]
    assert set(read_results(out)) == {"tiny"}


@pytest.mark.slow
def test_eval_of_a_tiny_run_uses_its_training_template(tmp_path, capsys):
    from rsa_jax.data import write_toy_data
    from rsa_jax.training import train

    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=16)
    template = "USER: {prompt} ASSISTANT:"
    overrides = [f"data.path={data}", f"train.run_dir={tmp_path / 'run'}"]
    overrides += ["stages.0.steps=1", "stages.1.steps=1", "checkpoint.every=1"]
    overrides += [f"data.template={template}"]
    assert train(load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)).status == (
        "done"
    )
    out = tmp_path / "eval"
    argv = ["eval", str(tmp_path / "run"), "--prompts", "benign", "--judge", "refusal"]
    argv += ["--prompt-limit", "3", "--samples", "2", "--max-new-tokens", "4", "--n-boot", "10"]
    assert main([*argv, "--out", str(out)]) == 0
    assert f"template {template}" in capsys.readouterr().out
    rows = read_samples(out)
    assert len(rows) == 6 and {r["source"] for r in rows} == {"benign"}
