"""samples.jsonl: one row per sample with the text and its scores, from the library and from
`rsa-jax eval` run as a console script would be (the scorer module found in the working
directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rsa_jax.eval import Samples, SampleScores, read_samples, sample_rows, write_samples

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _samples(texts, prompt_index, finished):
    r = len(texts)
    return Samples(
        prompt_index=np.asarray(prompt_index),
        prompt_ids=np.zeros((r, 2), np.int32),
        prompt_mask=np.ones((r, 2), bool),
        tokens=np.zeros((r, 3), np.int32),
        lengths=np.array([len(t.split()) + int(f) for t, f in zip(texts, finished, strict=True)]),
        finished=np.asarray(finished),
        texts=texts,
    )


def test_rows_carry_each_sample_with_its_scores(tmp_path):
    prompts = ["first prompt", "zweite Frage: é?"]
    texts = ["a b", "c", "ü ß", "d e f"]
    samples = _samples(texts, [0, 0, 1, 1], [True, False, True, True])
    scores = SampleScores(
        prompt=[0, 0, 1, 1],
        reward=[1.0, 2.0, 3.0, 4.0],
        cost=[0.5, 0.0, 2.5, 1.0],
        catastrophic=np.array([False, False, True, False]),
        logratio=[0.1, -0.2, 0.3, 0.0],
    )
    rows = sample_rows("RSA-CVaR", prompts, samples, scores)
    path = write_samples(tmp_path, rows)  # a directory: <dir>/samples.jsonl
    assert path == str(tmp_path / "samples.jsonl")
    assert os.listdir(tmp_path) == ["samples.jsonl"]  # no temporary file left behind
    assert "ü ß" in (tmp_path / "samples.jsonl").read_text(encoding="utf-8")  # readable text
    got = read_samples(tmp_path)
    assert got == rows and len(got) == 4
    assert [(r["prompt"], r["sample"], r["text"]) for r in got] == [
        ("first prompt", 0, "a b"),
        ("first prompt", 1, "c"),
        ("zweite Frage: é?", 0, "ü ß"),
        ("zweite Frage: é?", 1, "d e f"),
    ]
    assert [r["reward"] for r in got] == [1.0, 2.0, 3.0, 4.0]
    assert [r["cost"] for r in got] == [0.5, 0.0, 2.5, 1.0]
    assert [r["finished"] for r in got] == [True, False, True, True]
    assert [r["catastrophic"] for r in got] == [False, False, True, False]
    assert [r["logratio"] for r in got] == pytest.approx([0.1, -0.2, 0.3, 0.0])
    assert {r["model"] for r in got} == {"RSA-CVaR"}
    no_reference = SampleScores(
        prompt=[0, 0, 1, 1], reward=[0.0] * 4, cost=[0.0] * 4, catastrophic=np.zeros(4, bool)
    )
    assert "logratio" not in sample_rows("m", prompts, samples, no_reference)[0]
    with pytest.raises(ValueError, match="4 samples but 2 scores"):
        sample_rows("m", prompts, samples, SampleScores([0, 1], [0, 0], [0, 0], np.zeros(2, bool)))


def test_read_samples_names_a_bad_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: not JSON"):
        read_samples(path)


SCORER = """
import numpy as np

def words(prompts, responses):
    n = np.array([float(len(r.split())) for r in responses])
    return {"reward": n, "cost": 10.0 - n, "catastrophic": n == 0}
"""

ENTRY = f"""
import sys
sys.path.insert(1, {ROOT!r})  # this checkout, after the script's own directory
from rsa_jax.cli import main
sys.exit(main())
"""


@pytest.mark.slow  # a CLI eval with its own compile (15 s); the API path runs by default
def test_cli_eval_writes_samples_and_finds_the_scorer_in_the_working_directory(tmp_path):
    from flax import nnx

    from rsa_jax.models import Llama, save_hf, tiny_config
    from rsa_jax.tasks import SafetyTask, make_tokenizer

    tok = make_tokenizer(SafetyTask())
    model = Llama(tiny_config(vocab_size=len(tok), max_position_embeddings=64), rngs=nnx.Rngs(0))
    save_hf(model, str(tmp_path / "policy"), tok)
    # A console script lives elsewhere: its directory, not the working directory, is sys.path[0].
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "rsa-jax-entry.py").write_text(ENTRY)
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_words_scorer.py").write_text(SCORER)
    (work / "prompts.txt").write_text("ask topic0 style1 n2\nask topic3 style5 n0\n")
    command = [
        sys.executable,
        str(tmp_path / "bin" / "rsa-jax-entry.py"),
        "eval",
        str(tmp_path / "policy"),
        "--scorer",
        "my_words_scorer:words",
        "--prompts",
        "prompts.txt",
        "--template",
        "{prompt}",
        "--samples",
        "3",
        "--max-new-tokens",
        "4",
        "--n-boot",
        "20",
        "--memory-gb",
        "0.001",
        "--out",
        "out",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_samples(work / "out")
    assert len(rows) == 6
    assert [(r["prompt"], r["sample"]) for r in rows] == [
        (p, i) for p in ("ask topic0 style1 n2", "ask topic3 style5 n0") for i in range(3)
    ]
    for r in rows:
        assert r["model"] == "policy"
        assert r["reward"] == len(r["text"].split()) and r["cost"] == 10.0 - r["reward"]
        assert isinstance(r["finished"], bool) and 1 <= r["length"] <= 4
    results = json.loads((work / "out" / "results.json").read_text())
    assert results["samples"]["policy"]["num_samples"] == 6
    assert "samples.jsonl" in done.stdout
