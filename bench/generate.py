"""Our sampling throughput against transformers' `generate`, on the same SmolLM2-135M weights.

Both sides sample `--new-tokens` tokens per row (no early stop: EOS is not an end id for ours, and
`min_new_tokens` keeps transformers going) with temperature 1, top-p 0.95 and a KV cache, in
float32, from the same left-padded chat-template prompts, at batch 1 and batch 32. Ours is
`rsa_jax.generate.generate` (one jitted prefill + `lax.while_loop` decode), transformers' is
`LlamaForCausalLM.generate` (PyTorch eager, its dynamic cache). New tokens per second are
medians over `--repeats` timed runs after one untimed warm-up (our compile), the two sides
alternating within each repetition so a load change on a shared machine hits both alike. The
last line is one JSON object with `ours_over_torch_b1` and `ours_over_torch_b32` (our tokens/s
over transformers'; > 1: ours is faster).

    pip install -e '.[bench]'                       # torch==2.13.0, the CPU wheel
    python bench/generate.py                        # batches 1 and 32, 64 new tokens, 3 repeats
    python bench/generate.py --batches 1 --new-tokens 16 --repeats 1   # smoke
    python bench/generate.py --no-torch             # ours only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

ARTIFACT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "artifacts", "smollm2-135m"
)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "Name three prime numbers.",
    "Why is the sky blue?",
    "Give me a tip for learning to code.",
    "What does a bee do all day?",
    "Summarise the plot of Hamlet in one sentence.",
]


def prompts(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded chat-template prompts [B, P] and their mask, the questions in turn."""
    rows = []
    for i in range(batch):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((batch, width), pad, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


class Ours:
    def __init__(self, path: str):
        from rsa_jax.eval import load_model

        self.model, self.tokenizer = load_model(path, compute_dtype="float32")

    def run(self, ids, mask, new_tokens: int, seed: int) -> float:
        import jax

        from rsa_jax.generate import generate

        t0 = time.perf_counter()
        out = generate(
            self.model,
            ids.astype(np.int32),
            mask.astype(bool),
            jax.random.key(seed),
            max_new_tokens=new_tokens,
            eos_ids=(),  # no early stop: every row makes new_tokens tokens
            temperature=1.0,
            top_p=0.95,
        )
        jax.block_until_ready(out.tokens)
        seconds = time.perf_counter() - t0
        assert int(np.min(np.asarray(out.lengths))) == new_tokens
        return seconds


class Torch:
    def __init__(self, path: str):
        import torch
        from transformers import LlamaForCausalLM

        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(self, ids, mask, new_tokens: int, seed: int) -> float:
        torch = self.torch
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                top_k=0,
                use_cache=True,
                pad_token_id=int(ids[0, 0]),
            )
        seconds = time.perf_counter() - t0
        assert out.shape[1] - ids.shape[1] == new_tokens
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=ARTIFACT)
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    ours = Ours(args.model)
    sides = {"ours": ours}
    if not args.no_torch:
        sides["torch"] = Torch(args.model)
    result: dict = {"new_tokens": args.new_tokens, "repeats": args.repeats, "cpus": os.cpu_count()}
    for batch in (int(b) for b in args.batches.split(",")):
        ids, mask = prompts(ours.tokenizer, batch)
        for side in sides.values():  # warm-up: our compile, torch's first-call setup
            side.run(ids, mask, args.new_tokens, seed=0)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.repeats):
            for name, side in sides.items():
                times[name].append(side.run(ids, mask, args.new_tokens, seed=r + 1))
        for name, seconds in times.items():
            rate = batch * args.new_tokens / statistics.median(seconds)
            result[f"{name}_tokens_per_s_b{batch}"] = round(rate, 1)
            print(
                f"batch {batch:3d} prompt {ids.shape[1]:3d} tokens  {name:5s}: {rate:9.1f} new "
                f"tokens/s (median of {len(seconds)}: {statistics.median(seconds):.3f} s)",
                flush=True,
            )
        if "torch" in times:
            ratio = result[f"ours_tokens_per_s_b{batch}"] / result[f"torch_tokens_per_s_b{batch}"]
            result[f"ours_over_torch_b{batch}"] = round(ratio, 3)
            print(f"batch {batch:3d}: ours / transformers = {ratio:.2f}x", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
