"""Our Qwen3, Gemma 3 and sliding-window Mistral against transformers' own PyTorch classes.

For each family we build a small random model (random norms too, so every tensor matters),
write it with `save_hf`, load that directory with transformers' `AutoModelForCausalLM`
(`Qwen3ForCausalLM`, `Gemma3ForCausalLM`, `MistralForCausalLM`; eager attention, float32) and
compare, on left- and right-padded rows longer than the sliding window:

- logits on every real token (max absolute difference; the target is 1e-4 in float32);
- greedy generations: ours (`rsa_jax.generate.generate`, KV cache) against `model.generate`
  with `do_sample=False` on the same left-padded prompts (whether every token matches).

The last line is one JSON object with both per family. Needs the optional torch extra:

    pip install torch==2.13.0            # the CPU wheel (bench only, never the tests)
    python bench/vs_transformers_models.py
    python bench/vs_transformers_models.py --families gemma3_text --new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsa_jax.generate import generate
from rsa_jax.models import Llama, LlamaConfig, save_hf

# Small but not tiny: several layers (Gemma: 5 sliding then 1 global, as its pattern of 6),
# GQA, head_dim != D / H, a window shorter than the rows.
COMMON = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,
    max_position_embeddings=2048,
    bos_token_id=None,
    eos_token_id=None,
)
FAMILIES = {
    "qwen3": LlamaConfig(
        **COMMON, model_type="qwen3", qk_norm=True, rms_norm_eps=1e-6, rope_theta=1e6
    ),
    "gemma3_text": LlamaConfig(
        **COMMON,
        model_type="gemma3_text",
        qk_norm=True,
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=True,
        hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        layer_types=("sliding_attention",) * 5 + ("full_attention",),
        sliding_window=5,
        rope_theta=1e6,
        rope_local_theta=1e4,
        rope_linear_factor=8.0,
        query_pre_attn_scalar=64.0,
    ),
    # Gemma 3 checkpoints set no soft-capping; transformers' Gemma3ForCausalLM applies the final
    # one when set (its attention ignores attn_logit_softcapping, and so does `from_hf`).
    "gemma3_softcap": LlamaConfig(
        **COMMON,
        model_type="gemma3_text",
        qk_norm=True,
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=True,
        hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        layer_types=("sliding_attention", "full_attention") * 3,
        sliding_window=4,
        rope_theta=1e6,
        rope_local_theta=1e4,
        query_pre_attn_scalar=48.0,
        final_logit_softcapping=5.0,
    ),
    "mistral": LlamaConfig(
        **COMMON,
        model_type="mistral",
        layer_types=("sliding_attention",) * 6,
        sliding_window=5,
        rope_theta=1e6,
    ),
}


def random_model(config: LlamaConfig, seed: int) -> Llama:
    model = Llama(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "weight":  # norms around their neutral value (0 for Gemma's 1 + w)
            var.set_value(var[...] + jnp.asarray(0.1 * rng.normal(size=var.shape), var.dtype))
        elif path[-1] in ("embed", "lm_head"):  # logits of a few units, not near-uniform
            var.set_value(var[...] * 10)
    return model


def compare(name: str, config: LlamaConfig, rows: int, length: int, new_tokens: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = random_model(config, seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, size=(rows, length)).astype(np.int32)
    # Row 0 full, then rows padded on the left, on the right and on both sides.
    mask = np.ones((rows, length), bool)
    for r in range(1, rows):
        left, right = [(3, 0), (0, 4), (2, 3)][(r - 1) % 3]
        mask[r, :left] = False
        mask[r, length - right :] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = np.asarray(
        model.logits(model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        torch_model = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            theirs = torch_model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long),
            ).logits.numpy()
        logits_diff = float(np.abs(ours[mask] - theirs[mask]).max())
        # Greedy generation from left-padded prompts (the last `length // 2` slots of each row).
        prompt = ids[:, : length // 2].copy()
        prompt_mask = np.ones(prompt.shape, bool)
        for r in range(1, rows):
            prompt_mask[r, : r % (length // 4)] = False
        prompt = np.where(prompt_mask, prompt, 0)
        out = generate(model, prompt, prompt_mask, jax.random.key(0), max_new_tokens=new_tokens)
        with torch.no_grad():
            hf_tokens = torch_model.generate(
                input_ids=torch.tensor(prompt, dtype=torch.long),
                attention_mask=torch.tensor(prompt_mask, dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )[:, prompt.shape[1] :].numpy()
    our_tokens = np.asarray(out.tokens)
    return {
        "family": name,
        "logits_max_abs_diff": logits_diff,
        "logits_scale": float(np.abs(theirs[mask]).max()),
        "greedy_match": bool(np.array_equal(our_tokens, hf_tokens)),
        "greedy_tokens_equal": f"{int((our_tokens == hf_tokens).sum())}/{our_tokens.size}",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = []
    for name in args.families.split(","):
        result = compare(name, FAMILIES[name], args.rows, args.length, args.new_tokens, args.seed)
        print(
            f"{name:12s} logits max |ours - transformers| = {result['logits_max_abs_diff']:.2e} "
            f"(max |logit| {result['logits_scale']:.2f}); greedy generations "
            f"{'match' if result['greedy_match'] else 'DIFFER'} "
            f"({result['greedy_tokens_equal']} tokens)",
            flush=True,
        )
        results.append(result)
    print(json.dumps({r["family"]: {k: v for k, v in r.items() if k != "family"} for r in results}))


if __name__ == "__main__":
    main()
