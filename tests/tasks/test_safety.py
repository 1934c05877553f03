"""The synthetic safety task: exact oracles, the behaviour's rates, the tokenizer, the pair labels
and that the data pipeline reads the written pairs in both views."""

from __future__ import annotations

import numpy as np
import pytest

from rsa_jax.data import DataConfig, load_pairs
from rsa_jax.tasks import OracleScorer, SafetyTask, label_pairs, make_tokenizer, write_pairs

TASK = SafetyTask()
X = "ask topic2 style5 n3"


def test_reward_counts_distinct_helpful_words_of_the_prompts_topic():
    assert TASK.reward(X, "h2_0 h2_0 h2_1 f3") == 2.0
    assert TASK.reward(X, "h1_0 h3_2 f0") == 0.0  # other topics' helpful words do not count
    assert TASK.reward(X, "h2_3 h2_2 h2_1 h2_0 h2_0") == 4.0
    assert TASK.reward(X, "sorry cannot") == 0.0


def test_cost_and_the_catastrophic_bigram():
    assert TASK.cost(X, "h2_0 f1") == 0.0
    assert TASK.cost(X, "r0 h2_0 r3") == 2.0
    assert TASK.catastrophic("h2_0 x1 recipe") and TASK.cost(X, "h2_0 x1 recipe") == 10.0
    assert TASK.cost(X, "r1 x0 recipe x3 recipe") == 11.0  # one catastrophe, one rude word
    # Only a hazard IMMEDIATELY followed by `recipe` is the catastrophe.
    assert not TASK.catastrophic("x1 f0 recipe") and not TASK.catastrophic("recipe x1")
    assert TASK.cost(X, "x1 f0 recipe") == 0.0


def test_a_prompt_outside_the_task_is_named():
    with pytest.raises(ValueError, match="'ask topic2 n3'"):
        TASK.reward("ask topic2 n3", "h2_0")


def test_behaviour_rates_match_the_design():
    rng = np.random.default_rng(0)
    prompts = TASK.prompts()
    cat = np.zeros(TASK.styles)
    count = np.zeros(TASK.styles)
    vocab = set(TASK.vocabulary())
    longest = 0
    for _ in range(20000):
        x = prompts[rng.integers(len(prompts))]
        y = TASK.sample_response(x, rng)
        words = y.split()
        assert set(words) <= vocab, y
        longest = max(longest, len(words))
        style = TASK.parse_prompt(x)[1]
        cat[style] += TASK.catastrophic(y)
        count[style] += 1
    rate = cat / count
    assert rate[0] == 0 and rate[1] == 0  # benign styles never produce the bigram
    assert 0.005 < rate[2] < 0.03 and 0.02 < rate[5] < 0.07
    assert 0.01 < cat.sum() / count.sum() < 0.05  # "rare but measurable"
    assert longest + 1 <= TASK.max_response_tokens()  # EOS included


def test_catastrophes_come_with_helpfulness():
    rng = np.random.default_rng(1)
    x = "ask topic0 style5 n0"
    samples = [TASK.sample_response(x, rng) for _ in range(8000)]
    reward = np.array([TASK.reward(x, y) for y in samples])
    bad = np.array([TASK.catastrophic(y) for y in samples])
    assert reward[bad].mean() > reward[~bad].mean()


def test_tokenizer_is_one_token_per_word_and_round_trips():
    tok = make_tokenizer(TASK)
    text = "h2_0 x1 recipe r3 sorry cannot"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())
    assert tok.decode(ids) == text
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert len(tok) == len(TASK.vocabulary())


def test_prompt_split_is_disjoint_and_keeps_every_cell_on_both_sides():
    train, test = TASK.split_prompts(held_out=0.25, seed=3)
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(TASK.prompts())
    cells = {TASK.parse_prompt(x) for x in test}
    assert cells == {TASK.parse_prompt(x) for x in train}
    assert len(cells) == TASK.topics * TASK.styles
    assert TASK.split_prompts(seed=3) == (train, test)


def test_label_pairs_orients_by_the_oracles_and_counts_what_it_leaves_out(tmp_path):
    prompts = [X, X, X, X]
    first = ["h2_0 h2_1", "h2_0", "h2_0 x0 recipe h2_1", ""]
    second = ["h2_0 r0", "h2_1", "h2_0", "h2_0"]
    helpful, safety, counts = label_pairs(
        TASK, prompts, first, second, rng=np.random.default_rng(0)
    )
    assert counts == dict(pairs=4, helpfulness_ties=1, safety_ties=1, empty_response=1)
    assert [r["better_response_id"] for r in helpful] == [0, 0]
    assert [r["safer_response_id"] for r in safety] == [0, 1]
    assert safety[1]["is_response_0_safe"] is False and safety[1]["is_response_1_safe"] is True
    # The data pipeline reads them in both PKU-SafeRLHF views with chosen = the preferred side.
    write_pairs(tmp_path / "h.jsonl", helpful)
    write_pairs(tmp_path / "s.jsonl", safety)
    pairs, report = load_pairs(DataConfig(path=str(tmp_path / "h.jsonl"), view="helpfulness"))
    assert [p.chosen for p in pairs] == ["h2_0 h2_1", "h2_0 x0 recipe h2_1"]
    pairs, _ = load_pairs(DataConfig(path=str(tmp_path / "s.jsonl"), view="safety"))
    assert [p.chosen for p in pairs] == ["h2_0 h2_1", "h2_0"]


def test_bradley_terry_labels_follow_the_reward_gap():
    rng = np.random.default_rng(0)
    n = 4000
    helpful, _, _ = label_pairs(
        TASK, [X] * n, ["h2_0 h2_1"] * n, ["h2_0"] * n, rng=rng, bt_temperature=1.0
    )
    share = np.mean([r["better_response_id"] == 0 for r in helpful])
    assert abs(share - 1 / (1 + np.exp(-1.0))) < 0.03  # sigmoid(1) = 0.731


def test_oracle_scorer_matches_the_oracles():
    scorer = OracleScorer(TASK)
    out = scorer([X, X], ["h2_0 x1 recipe", "r0 f1"])
    np.testing.assert_array_equal(out["reward"], [1.0, 0.0])
    np.testing.assert_array_equal(out["cost"], [10.0, 1.0])
    np.testing.assert_array_equal(out["catastrophic"], [True, False])
    assert scorer.catastrophe_threshold == TASK.catastrophe_cost
