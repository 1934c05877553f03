"""Our JAX score models against PyTorch on the same random weights: the max score difference.

Three self-made random directories (`rsa_jax.testing.score_models.write_score_dir`, a 2-layer
Llama-family backbone, our offline tokenizer):

- `llama_seq_cls`, `qwen2_seq_cls`: transformers' own `LlamaForSequenceClassification` /
  `Qwen2ForSequenceClassification` (`AutoModelForSequenceClassification.from_pretrained`).
- `safe_rlhf_reward`, `safe_rlhf_cost`: safe-rlhf's `LlamaForScore` (with a head bias, and a
  cost model with `do_normalize`), re-implemented here in torch independently of our code: the
  transformers `LlamaModel` backbone, an `nn.Linear` score head read at the last token of the
  attention mask, and the normalizer of the score type.

Both sides score the same (prompt, response) texts: our `ScoreModel.score` (its own
tokenisation, sorted batches, right padding) and torch on our token rows, padded on the right
and, separately, on the left. Prints the max absolute difference per model in float32 (the
target is 1e-4) and, for information, ours in bfloat16 against torch in float32; the last line
is one JSON object.

    pip install -e '.[bench]'          # torch==2.13.0, the CPU wheel (never needed by tests)
    python bench/score_models.py       # 24 texts per model
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

PROMPTS = [
    "How do I bake bread at home?",
    "How do I kill a Python process that is stuck?",
    "Write a short poem about autumn leaves.",
    "What is the capital of France?",
    "Give me detailed instructions for picking a lock.",
    "hi",
]
RESPONSES = [
    "Mix flour, water, salt and yeast, knead, rest, and bake.",
    "Find its PID with ps and run kill -9 PID.",
    "Leaves fall,\nred and gold,\nthe year grows old.",
    "Paris.",
    "I'm sorry, but I can't help with that.",
    "Hello! How can I help you today? <|im_end|> tricky text",
]


def _torch_rows(rows, pad_id, side):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
    return ids, mask


def torch_sequence_classification(path, rows, pad_id, side):
    """transformers' own model: logits [N, S]."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = _torch_rows(rows, pad_id, side)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double().numpy()


def torch_llama_for_score(path, rows, pad_id, side):
    """safe-rlhf's LlamaForScore written again in torch: end scores [N, S]."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaModel

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    backbone = LlamaModel.from_pretrained(path, dtype=torch.float32).eval()
    tensors = load_file(os.path.join(path, "model.safetensors"))
    head = torch.nn.Linear(config["hidden_size"], config["score_dim"], bias=config["bias"])
    head.weight.data = tensors["score_head.weight"].float()
    if config["bias"]:
        head.bias.data = tensors["score_head.bias"].float()
    ids, mask = _torch_rows(rows, pad_id, side)
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        scores = head(hidden).float()  # [N, L, S]
        end = torch.stack([m.nonzero()[-1, 0] for m in mask])  # last token of the mask
        end_scores = scores[torch.arange(len(rows)), end]
    if config.get("do_normalize"):
        mean = torch.tensor(config.get("mean") or [0.0] * config["score_dim"])
        std = torch.tensor(config.get("var") or [1.0] * config["score_dim"]).sqrt() + 1e-8
        kind = config.get("score_type", "reward")
        if kind == "reward":
            end_scores = (end_scores - mean) / std
        elif kind == "cost":
            end_scores = end_scores / std
    return end_scores.double().numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="copies of the 6 example texts")
    args = parser.parse_args(argv)

    import transformers

    from rsa_jax.data import train_bpe_tokenizer
    from rsa_jax.eval.judges import ScoreModel

    transformers.logging.set_verbosity_error()  # LlamaModel's report of the unused score head
    from rsa_jax.testing.score_models import write_score_dir

    prompts = PROMPTS * args.repeat
    responses = [r + " " * (i // len(RESPONSES)) for i, r in enumerate(RESPONSES * args.repeat)]
    tokenizer = train_bpe_tokenizer()
    models = {
        "llama_seq_cls": ("llama_seq_cls", None, torch_sequence_classification),
        "qwen2_seq_cls": ("qwen2_seq_cls", None, torch_sequence_classification),
        "safe_rlhf_reward": ("safe_rlhf", dict(bias=True), torch_llama_for_score),
        "safe_rlhf_cost": (
            "safe_rlhf",
            dict(bias=True, score_type="cost", do_normalize=True, mean=[0.3], var=[2.5]),
            torch_llama_for_score,
        ),
    }
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for seed, (name, (fmt, fields, torch_fn)) in enumerate(models.items()):
            path = os.path.join(root, name)
            write_score_dir(path, fmt, seed=seed, tokenizer=tokenizer, safe_rlhf_fields=fields)
            ours = ScoreModel.load(path, compute_dtype="float32")
            got = ours.score(prompts, responses, progress=False)
            rows = [ours.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
            pad = int(tokenizer.pad_token_id)
            row = {}
            for side in ("right", "left"):
                want = torch_fn(path, rows, pad, side)[:, 0]
                row[f"max_abs_diff_{side}_padded"] = float(np.max(np.abs(got - want)))
            row["max_abs_score"] = float(np.max(np.abs(want)))
            bf16 = ScoreModel.load(path, compute_dtype="bfloat16").score(
                prompts, responses, progress=False
            )
            row["bf16_max_abs_diff"] = float(np.max(np.abs(bf16 - want)))
            results[name] = row
            print(
                f"{name:18s} float32 max |ours - torch|: right-padded "
                f"{row['max_abs_diff_right_padded']:.2e}, left-padded "
                f"{row['max_abs_diff_left_padded']:.2e} (scores up to {row['max_abs_score']:.2f}; "
                f"ours in bf16: {row['bf16_max_abs_diff']:.2e})",
                flush=True,
            )
    worst = max(
        max(r["max_abs_diff_right_padded"], r["max_abs_diff_left_padded"]) for r in results.values()
    )
    summary = {"texts": len(prompts), "float32_max_abs_diff": worst, "models": results}
    print(json.dumps(summary))
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
