"""Tokenisation, truncation, the batch layout, bucketing, host sharding and exact resume."""

from __future__ import annotations

import collections
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rsa_jax.data import (
    DataConfig,
    DataReport,
    PairRecord,
    PairTokenizer,
    TokenizedPair,
    collate,
    make_pair_dataset,
    make_pair_iterator,
    padding_efficiency,
    train_bpe_tokenizer,
)

SACPO = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer()


def records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["bread", "safe", "help", "no", "story", "Paris", "caf\u00e9", "\U0001f642"]

    def text(k):
        return " ".join(rng.choice(words, size=k))

    return [
        PairRecord(
            prompt=f"q{i} " + text(int(rng.integers(1, 12))),
            chosen=text(int(rng.integers(1, 30))),
            rejected=text(int(rng.integers(1, 30))) + " x",
            origin=f"mem:{i + 1}",
        )
        for i in range(n)
    ]


def test_truncation_rules(tokenizer):
    config = DataConfig(template=SACPO, max_prompt_len=5, max_response_len=4)
    encode = PairTokenizer(tokenizer, config)
    long_prompt = "one two three four five six seven eight nine ten"
    full = tokenizer(SACPO.format(prompt=long_prompt))["input_ids"]
    pair = encode(PairRecord(long_prompt, "a b c d e f g", "z", "mem:1"))
    np.testing.assert_array_equal(pair.prompt, full[-5:])  # the END of the prompt survives
    response = tokenizer("a b c d e f g", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(pair.chosen, response[:3] + [tokenizer.eos_token_id])
    assert pair.rejected[-1] == tokenizer.eos_token_id and len(pair.rejected) <= 4
    # At the edge: room for EOS only, the response becomes [EOS] (never an empty mask).
    edge = PairTokenizer(tokenizer, DataConfig(template=SACPO, max_response_len=1))
    np.testing.assert_array_equal(
        edge(PairRecord("p", "long answer here", "x", "m")).chosen, [tokenizer.eos_token_id]
    )


def test_chat_template_prompts(tokenizer):
    encode = PairTokenizer(tokenizer, DataConfig(max_prompt_len=64))
    pair = encode(PairRecord([{"role": "user", "content": "hi"}], "yo", "no", "m"))
    text = tokenizer.decode(pair.prompt)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    same = encode(PairRecord("hi", "yo", "no", "m"))
    np.testing.assert_array_equal(same.prompt, pair.prompt)


def test_batch_layout_against_direct_construction():
    pad = 0
    pairs = [
        TokenizedPair(np.array([5, 6, 7]), np.array([8, 9, 1]), np.array([4, 1])),
        TokenizedPair(np.array([3]), np.array([1]), np.array([2, 2, 2, 1])),
    ]
    batch = collate(pairs, prompt_len=4, response_len=5, pad_id=pad)
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 9) for k in batch}
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    for r, (prompt, response) in enumerate(rows):
        tokens = [pad] * (4 - len(prompt)) + list(prompt) + list(response)
        tokens += [pad] * (9 - len(tokens))
        real = [False] * (4 - len(prompt)) + [True] * (len(prompt) + len(response))
        real += [False] * (9 - len(real))
        assert batch["input_ids"][r].tolist() == tokens
        assert batch["attention_mask"][r].tolist() == real
        n_before = 0
        for t in range(9):
            if real[t]:
                assert batch["positions"][r, t] == n_before
                n_before += 1
            elif n_before == 0:
                assert batch["positions"][r, t] == 0  # left padding
            predicts_response = t + 1 < 9 and 4 <= t + 1 < 4 + len(response)
            assert batch["loss_mask"][r, t] == predicts_response
            assert batch["labels"][r, t] == (tokens[t + 1] if t + 1 < 9 else pad)
        # The last prompt token predicts the first response token.
        assert batch["loss_mask"][r, 3] and batch["labels"][r, 3] == response[0]
        assert batch["positions"][r, 4] == len(prompt)
    assert padding_efficiency(batch) == pytest.approx(batch["attention_mask"].mean())


def _stream(dataset):
    return [b for b in dataset]


def _prompts(batches):
    """Identify pairs by their prompt token rows (chosen half of each batch)."""
    out = []
    for b in batches:
        half = len(b["input_ids"]) // 2
        out += [
            tuple(row[m].tolist())
            for row, m in zip(b["input_ids"][:half], b["attention_mask"][:half], strict=True)
        ]
    return out


def _pair_prompts(batches):
    """The prompt of each pair, checking that rows i and B + i hold the same prompt."""
    out = []
    for b in batches:
        is_response = np.zeros_like(b["loss_mask"])
        is_response[:, 1:] = b["loss_mask"][:, :-1]
        prompt_mask = b["attention_mask"] & ~is_response
        prompts = [
            tuple(row[m].tolist()) for row, m in zip(b["input_ids"], prompt_mask, strict=True)
        ]
        half = len(prompts) // 2
        assert prompts[:half] == prompts[half:]
        out += prompts[:half]
    return out


@pytest.mark.parametrize("bucketed", [False, True], ids=["fixed", "buckets"])
@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_hosts_partition_the_global_batch(tokenizer, hosts, bucketed):
    """Host blocks are disjoint, cover everything, and stacked in host order are exactly the
    single-host batch (chosen rows [0, B), rejected [B, 2B)), bucket shape included."""
    data = records(26)
    extra = dict(prompt_buckets=(16, 32), response_buckets=(16, 48), sort_window=2)
    config = DataConfig(
        template=SACPO,
        batch_size=6,
        seed=3,
        epochs=2,
        max_prompt_len=32,
        max_response_len=48,
        **(extra if bucketed else {}),
    )
    single = _stream(make_pair_dataset(data, tokenizer, config))
    parts = [
        _stream(make_pair_dataset(data, tokenizer, config, process_index=p, process_count=hosts))
        for p in range(hosts)
    ]
    assert len(single) == 52 // 6 and all(len(part) == len(single) for part in parts)
    for step, whole in enumerate(single):
        blocks = [part[step] for part in parts]
        assert all(len(block["input_ids"]) == 12 // hosts for block in blocks)
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([blk[key] for blk in blocks]), whole[key])
    counts = collections.Counter(_pair_prompts(single))
    assert sum(counts.values()) == 48 and max(counts.values()) <= 2 and len(counts) == 26
    widths = {b["input_ids"].shape[1] for b in single}
    assert widths <= {16 + 16, 16 + 48, 32 + 16, 32 + 48} if bucketed else widths == {80}


def test_host_rows_and_bad_host_counts(tokenizer):
    from rsa_jax.data._pipeline import host_rows

    assert host_rows(3, 0, 3) == [(0, True), (1, True)]
    assert host_rows(3, 1, 3) == [(2, True), (0, False)]  # a block may straddle chosen/rejected
    assert host_rows(3, 2, 3) == [(1, False), (2, False)]
    config = DataConfig(template=SACPO, batch_size=3, max_prompt_len=32, max_response_len=48)
    blocks = [
        _stream(make_pair_dataset(records(6), tokenizer, config, process_index=p, process_count=3))
        for p in range(3)
    ]
    whole = _stream(make_pair_dataset(records(6), tokenizer, config))
    for step in range(2):
        np.testing.assert_array_equal(
            np.concatenate([blk[step]["labels"] for blk in blocks]), whole[step]["labels"]
        )
    with pytest.raises(ValueError, match="divisible"):
        make_pair_dataset(records(8), tokenizer, config, process_count=4)
    with pytest.raises(ValueError, match="drop_remainder"):
        make_pair_dataset(
            records(8),
            tokenizer,
            DataConfig(template=SACPO, drop_remainder=False),
            process_count=2,
        )


def test_remainder_is_counted(tokenizer):
    config = DataConfig(template=SACPO, batch_size=4, max_prompt_len=32, max_response_len=48)
    report = DataReport()
    ds = make_pair_dataset(
        records(11), tokenizer, config, process_index=1, process_count=2, report=report
    )
    assert len(ds) == 2 and report.dropped == {"final partial batch (drop_remainder)": 3}


def test_epochs_reshuffle_and_cover(tokenizer):
    config = DataConfig(
        template=SACPO, batch_size=2, epochs=2, seed=1, max_prompt_len=32, max_response_len=48
    )
    stream = _prompts(_stream(make_pair_dataset(records(10), tokenizer, config)))
    first, second = stream[:10], stream[10:]
    assert sorted(first) == sorted(second) and first != second


def test_buckets_and_length_grouping(tokenizer):
    data = records(64, seed=2)
    common = dict(template=SACPO, batch_size=4, max_prompt_len=32, max_response_len=64, seed=0)
    plain = _stream(make_pair_dataset(data, tokenizer, DataConfig(**common)))
    bucketed = _stream(
        make_pair_dataset(
            data,
            tokenizer,
            DataConfig(
                **common, prompt_buckets=(16, 32), response_buckets=(16, 32, 64), sort_window=16
            ),
        )
    )
    shapes = {b["input_ids"].shape[1] for b in bucketed}
    assert shapes <= {p + r for p in (16, 32) for r in (16, 32, 64)}
    assert {b["input_ids"].shape[1] for b in plain} == {96}
    assert sorted(_prompts(bucketed)) == sorted(_prompts(plain))  # same pairs, regrouped
    eff_plain = np.mean([padding_efficiency(b) for b in plain])
    eff_bucketed = np.mean([padding_efficiency(b) for b in bucketed])
    assert eff_bucketed > eff_plain
    # One window of 16 batches sorted by (response bucket, ...): only a batch that straddles two
    # response buckets mixes them, so at most (buckets used - 1) batches do.
    mixed, used = 0, set()
    for b in bucketed:
        lengths = b["loss_mask"].sum(1)  # response tokens per row
        half = len(lengths) // 2
        longest = np.maximum(lengths[:half], lengths[half:])
        kinds = {min(r for r in (16, 32, 64) if r >= n) for n in longest}
        mixed += len(kinds) > 1
        used |= kinds
    assert len(used) > 1 and mixed <= len(used) - 1


@pytest.mark.parametrize("seed", range(4))
def test_drop_remainder_with_length_grouping_keeps_every_batch_full(tokenizer, seed):
    # 10 pairs, batches of 4, windows of 3 batches: the last window holds 2 full batches and the
    # 2 leftover pairs, which must be dropped whatever order the window's batches are put in.
    config = DataConfig(
        template=SACPO,
        batch_size=4,
        sort_window=3,
        seed=seed,
        max_prompt_len=32,
        max_response_len=48,
    )
    report = DataReport()
    data = records(10, seed=seed)
    batches = _stream(make_pair_dataset(data, tokenizer, config, report=report))
    assert [len(b["input_ids"]) for b in batches] == [8, 8]
    assert report.dropped == {"final partial batch (drop_remainder)": 2}
    ungrouped = _stream(
        make_pair_dataset(data, tokenizer, DataConfig(**{**config.__dict__, "sort_window": 1}))
    )
    # Grouping reorders the kept pairs but keeps the same ones (the stream's first 8).
    assert sorted(_prompts(batches)) == sorted(_prompts(ungrouped))
    kept = DataConfig(**{**config.__dict__, "drop_remainder": False})
    sizes = [len(b["input_ids"]) // 2 for b in make_pair_dataset(data, tokenizer, kept)]
    assert sizes == [4, 4, 2]  # the partial batch is the stream's last


@pytest.mark.parametrize("sort_window", [1, 3])
def test_resume_after_n_batches_gives_the_same_stream(tokenizer, tmp_path, sort_window):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for r in records(30):
            f.write(
                json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n"
            )
    config = DataConfig(
        path=str(path),
        view="pairs",
        template=SACPO,
        batch_size=4,
        epochs=2,
        max_prompt_len=32,
        max_response_len=48,
        sort_window=sort_window,
        response_buckets=(16, 48),
    )
    iterator, _ = make_pair_iterator(config, tokenizer)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    rest = list(iterator)
    assert len(rest) == 15 - 5

    # Through an Orbax CheckpointManager, next to the train state, as the trainer saves it.
    train_state = {"step": np.array(5, np.int32), "w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    manager = ocp.CheckpointManager(
        tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    fresh, _ = make_pair_iterator(config, tokenizer)
    for _ in range(5):
        next(fresh)
    manager.save(
        5,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(train_state),
            data_iter=grain.checkpoint.CheckpointSave(fresh),
        ),
    )
    manager.wait_until_finished()
    next(fresh)  # the saved checkpoint must not follow the live iterator
    resumed, _ = make_pair_iterator(config, tokenizer)
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(train_state),
            data_iter=grain.checkpoint.CheckpointRestore(resumed),
        ),
    )
    manager.close()
    np.testing.assert_array_equal(restored["state"]["w"], train_state["w"])
    assert restored["data_iter"] is resumed and resumed.get_state() == state
    again = list(resumed)
    assert len(again) == len(rest)
    for a, b in zip(again, rest, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_left_out_rows_are_logged(tokenizer, tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "rejected": "a"}), json.dumps(good)]
    path.write_text("\n".join(lines) + "\n")
    config = DataConfig(path=str(path), view="pairs", template=SACPO, batch_size=1, on_error="skip")
    with caplog.at_level("WARNING", logger="rsa_jax.data._pipeline"):
        iterator, report = make_pair_iterator(config, tokenizer)
    assert len(list(iterator)) == report.pairs_kept == 2 and report.rows_read == 4
    assert "skipped (bad input): row: malformed JSON" in caplog.text
    assert "identical responses=1" in caplog.text
