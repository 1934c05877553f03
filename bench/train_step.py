"""One Ra-DPO train step with CVaR (cvar_reference, split vocabulary) on SmolLM2-135M, on the CPU:
the fused loss head vs the full-logits path. Reports compile time, step time, pairs/s, tokens/s
and XLA's compiled peak memory (temp + arguments + outputs).

    python bench/train_step.py                 # 4 pairs x (64 prompt + 64 response) tokens
    python bench/train_step.py --pairs 2 --prompt 32 --response 32 --steps 2

Needs artifacts/smollm2-135m (`make model` converts the bundled GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from rsa_jax.config import Config, DataConfig, ModelConfig, OptimConfig, StageConfig, TrainConfig
from rsa_jax.training import Engine, device_copy, state_shardings
from rsa_jax.training._mesh import place_batch

ARTIFACT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "artifacts", "smollm2-135m"
)


def make_batch(pairs, prompt, response, vocab, seed=0):
    rng = np.random.default_rng(seed)
    rows, length = 2 * pairs, prompt + response
    ids = rng.integers(10, vocab, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), bool)
    labels = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], 1)
    loss_mask = np.zeros_like(mask)
    loss_mask[:, prompt - 1 : -1] = True
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    return dict(
        input_ids=ids, positions=positions, attention_mask=mask, labels=labels, loss_mask=loss_mask
    )


def bench(head, args):
    stage = StageConfig(loss="ra_dpo", risk="cvar_reference", mu=0.95, split_vocab=True)
    config = Config(
        model=ModelConfig(path=args.model, compute_dtype=args.dtype, remat=True),
        data=DataConfig(batch_size=args.pairs),
        optim=OptimConfig(learning_rate=2e-5, warmup_ratio=0.0),
        train=TrainConfig(head=head, chunk_size=args.chunk),
        stages=[stage],
    )
    engine = Engine(config)
    reference = device_copy(engine.initial)
    state = engine.new_state(engine.initial)
    step = engine.compiled_step(engine.objective(stage), state_shardings(state))
    hyper = engine.hyper(stage, 100)
    batch = make_batch(args.pairs, args.prompt, args.response, engine.model.llama.vocab_size)
    batch = place_batch(batch, engine.layout.batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, reference, batch, hyper).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        ) / 2**20
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, reference, batch, hyper)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = 2 * args.pairs * (args.prompt + args.response)
    return dict(
        head=head,
        compile_s=round(compile_s, 2),
        step_s=round(step_s, 3),
        pairs_per_s=round(args.pairs / step_s, 3),
        tokens_per_s=round(tokens / step_s, 1),
        peak_mib=None if peak is None else round(peak, 1),
        loss=float(metrics["loss"]),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=ARTIFACT)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--heads", default="fused,logits")
    args = p.parse_args()
    print(
        f"device: {jax.devices()[0].device_kind}, pairs {args.pairs}, tokens/row "
        f"{args.prompt}+{args.response}, dtype {args.dtype}"
    )
    results = {}
    for head in args.heads.split(","):
        results[head] = bench(head, args)
        print(json.dumps(results[head]), flush=True)
    if {"fused", "logits"} <= set(results):
        f, g = results["fused"], results["logits"]
        ratios = dict(
            step_time_fused_over_logits=round(f["step_s"] / g["step_s"], 3),
            compile_time_fused_over_logits=round(f["compile_s"] / g["compile_s"], 3),
        )
        if f["peak_mib"] and g["peak_mib"]:
            ratios["peak_memory_fused_over_logits"] = round(f["peak_mib"] / g["peak_mib"], 3)
        print(json.dumps({"ratios (baseline: logits path, same run)": ratios}))


if __name__ == "__main__":
    main()
