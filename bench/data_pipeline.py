"""Data-pipeline benchmark: pairs/s through read -> view -> tokenise -> batch, on one core.

A synthetic PKU-SafeRLHF-schema dataset (default 20k pairs) with a realistic length spread
(log-normal prompt and response lengths, long tails) is written to JSON Lines, then read by the
full pipeline with a real byte-level BPE tokenizer: SmolLM2's from `artifacts/smollm2-135m` when it
has been converted, otherwise one trained here on the synthetic text (the output says which).
Reported: pairs/s for the whole pass and padding efficiency (real tokens / token slots), without
and with bucketing + length grouping, as ratios against the plain pipeline; and how many times
faster than the train step consumes pairs the pipeline produces them.

    python bench/data_pipeline.py            # 20k pairs
    python bench/data_pipeline.py --pairs 2000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from rsa_jax.data import DataConfig, make_pair_iterator, padding_efficiency

# environment.md: one SmolLM2-135M DPO step (policy fwd+bwd + reference fwd) on these CPUs takes
# about 8 s for 4 pairs x 128 tokens, i.e. 0.5 pairs/s. Our own train-step benchmark replaces
# this figure once it exists.
TRAIN_STEP_PAIRS_PER_S = 4 / 8.0
SMOLLM2_DIR = os.path.join(os.path.dirname(__file__), "..", "artifacts", "smollm2-135m")


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ra", "ti", "po", "de", "an", "ex", "qu"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(3000)]
    words += ["the", "a", "is", "to", "and", "of", "safe", "help", "sorry", "cannot", "\U0001f642"]

    def text(mean_words: float) -> str:
        k = max(1, int(rng.lognormal(np.log(mean_words), 0.8)))
        return " ".join(rng.choice(words, size=k)) + rng.choice([".", "?", "!"])

    return [
        {
            "prompt": text(25),
            "response_0": text(90),
            "response_1": text(90),
            "better_response_id": int(rng.integers(0, 2)),
            "safer_response_id": int(rng.integers(0, 2)),
            "is_response_0_safe": bool(rng.integers(0, 2)),
            "is_response_1_safe": bool(rng.integers(0, 2)),
        }
        for _ in range(n)
    ]


def load_tokenizer(rows: list[dict]):
    if os.path.exists(os.path.join(SMOLLM2_DIR, "tokenizer.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(SMOLLM2_DIR), "SmolLM2-135M (converted GGUF)"
    from rsa_jax.data import train_bpe_tokenizer

    corpus = [r["prompt"] + " " + r["response_0"] for r in rows[:5000]]
    return train_bpe_tokenizer(corpus, vocab_size=8192), "byte-level BPE trained here (8192)"


def run(config: DataConfig, tokenizer) -> tuple[float, float, int]:
    start = time.perf_counter()
    iterator, _ = make_pair_iterator(config, tokenizer)
    efficiencies, pairs = [], 0
    for batch in iterator:
        efficiencies.append(padding_efficiency(batch))
        pairs += len(batch["input_ids"]) // 2
    seconds = time.perf_counter() - start
    return pairs / seconds, float(np.mean(efficiencies)), pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    rows = synthetic_rows(args.pairs)
    tokenizer, which = load_tokenizer(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        base = dict(
            path=path,
            view="helpfulness",
            max_prompt_len=128,
            max_response_len=384,
            batch_size=args.batch,
            template="USER: {prompt} ASSISTANT:",
        )
        plain = run(DataConfig(**base), tokenizer)
        bucketed = run(
            DataConfig(
                **base,
                prompt_buckets=(32, 64, 128),
                response_buckets=(64, 128, 256, 384),
                sort_window=16,
            ),
            tokenizer,
        )
    print(f"{args.pairs} synthetic pairs, tokenizer: {which}, batch {args.batch}, one core")
    # Shared machines: a busy core slows the pipeline, so say how busy the machine was.
    print(f"load average over the run's last minute: {os.getloadavg()[0]:.1f}")
    print("| pipeline | pairs/s | vs plain | padding efficiency | vs plain | x train step |")
    print("|---|---|---|---|---|---|")
    for name, (rate, eff, _) in (("plain (P=128, R=384)", plain), ("buckets + grouping", bucketed)):
        print(
            f"| {name} | {rate:,.0f} | {rate / plain[0]:.2f} | {eff:.3f} | {eff / plain[1]:.2f} "
            f"| {rate / TRAIN_STEP_PAIRS_PER_S:,.0f} |"
        )
    print(
        f"x train step: pipeline pairs/s over the {TRAIN_STEP_PAIRS_PER_S} pairs/s a SmolLM2-135M "
        "train step consumes on the CPU (environment.md figure)"
    )


if __name__ == "__main__":
    main()
