"""Train-step throughput and model-FLOPs utilisation on an accelerator (run by accelerator.sh).

For each model (SmolLM2-135M from artifacts/smollm2-135m, or random-init with its config when the
directory is missing; a random-init 1B Llama shaped like Llama-3.2-1B) and each variant (our DPO
and Ra-DPO cvar_reference steps, fused and logits heads), in bfloat16 compute with float32 master
weights: compile once, one warm-up step, then the median of `--steps` timed steps. Prints tokens/s
and MFU = model FLOPs per second / the device's peak dense bf16 FLOP/s. Model FLOPs per token
(PaLM's convention, remat not counted): policy forward+backward 6 N + 12 l h e s, reference
forward 2 N + 4 l h e s, with N the matmul parameters (the unembedding included), l layers, h query
heads, e head dim, s tokens per row.

Ours goes through the public training API (`Engine`, `Engine.compiled_step`).
`--budget-s` stops starting new measurements once that much wall time has gone, so the whole run
fits a fixed slot; `--smoke` runs tiny random models at toy sizes (any backend, for the tests).

    bash bench/accelerator.sh                  # on a GPU machine
    bash bench/accelerator.sh --smoke          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from rsa_jax.config import Config, DataConfig, ModelConfig, OptimConfig, StageConfig
from rsa_jax.models import LlamaConfig, tiny_config
from rsa_jax.training import Engine, PairObjective, device_copy, state_shardings
from rsa_jax.training._mesh import place_batch

ARTIFACT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "artifacts", "smollm2-135m"
)
VARIANTS = (  # (name, loss, head)
    ("dpo/logits", "dpo", "logits"),
    ("dpo/fused", "dpo", "fused"),
    ("ra_dpo/logits", "ra_dpo", "logits"),
    ("ra_dpo/fused", "ra_dpo", "fused"),
)
# Peak dense bfloat16 FLOP/s (no sparsity) by a substring of `device_kind`, from the vendors'
# data sheets; the first match wins (longer names first). `--peak-tflops` overrides.
PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("V100", 125.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 197.0),
    ("TPU v4", 275.0),
)

SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
# Shaped like Llama-3.2-1B (1.24 B parameters), random init: nothing to download.
LLAMA_1B = LlamaConfig(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rope_theta=500000.0,
    rope_llama3=(32.0, 1.0, 4.0, 8192),
    tie_word_embeddings=True,
    max_position_embeddings=131072,
)


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def matmul_params(c: LlamaConfig) -> int:
    """Parameters that take part in matmuls: every block's projections and the unembedding."""
    d, f, h, k, e = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    )
    block = d * h * e * 2 + d * k * e * 2 + 3 * d * f
    return c.num_hidden_layers * block + d * c.vocab_size


def flops_per_step(c: LlamaConfig, rows: int, length: int) -> float:
    """Model FLOPs of one step: policy fwd+bwd and reference fwd over rows x length tokens."""
    n = matmul_params(c)
    attn = c.num_hidden_layers * c.num_attention_heads * c.head_dim * length
    per_token = (6 * n + 12 * attn) + (2 * n + 4 * attn)
    return float(per_token) * rows * length


def make_batch(pairs: int, length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows, prompt = 2 * pairs, length // 4
    ids = rng.integers(10, vocab, (rows, length)).astype(np.int32)
    loss_mask = np.zeros((rows, length), bool)
    loss_mask[:, prompt - 1 : -1] = True
    return dict(
        input_ids=ids,
        positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        attention_mask=np.ones((rows, length), bool),
        labels=np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], 1),
        loss_mask=loss_mask,
    )


def bench_model(name, llama, path, args, deadline, peak, rows_out) -> None:
    model_cfg = ModelConfig(
        path=path, compute_dtype=args.dtype, remat=args.remat, scan_layers=args.scan_layers
    )
    optim = OptimConfig(learning_rate=1e-5, warmup_ratio=0.0, weight_decay=0.0)
    pairs, length = args.pairs[name], args.length
    config = Config(model=model_cfg, data=DataConfig(batch_size=pairs), optim=optim)
    engine = Engine(config, llama=llama, check_devices=False)
    reference = device_copy(engine.initial)
    state = engine.new_state(engine.initial)  # threaded through every variant
    batch = place_batch(make_batch(pairs, length, llama.vocab_size), engine.layout.batch)
    flops = flops_per_step(llama, 2 * pairs, length)
    for variant, loss, head in VARIANTS:
        if time.monotonic() > deadline:
            print(f"{name} {variant}: skipped (time budget spent)", flush=True)
            continue
        stage = StageConfig(loss=loss, risk="cvar_reference", mu=0.95, split_vocab=True)
        objective = PairObjective(stage.kernel, head=head, chunk_size=args.chunk)
        step = engine.compiled_step(objective, state_shardings(state))
        hyper = engine.hyper(stage, 1000)
        t0 = time.perf_counter()
        compiled = step.lower(state, reference, batch, hyper).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(state, reference, batch, hyper)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, reference, batch, hyper)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        row = dict(
            model=name,
            variant=variant,
            pairs=pairs,
            length=length,
            dtype=args.dtype,
            compile_s=round(compile_s, 1),
            step_s=round(step_s, 4),
            tokens_per_s=round(2 * pairs * length / step_s, 1),
            model_tflops_per_s=round(flops / step_s / 1e12, 3),
            mfu=None if peak is None else round(flops / step_s / peak, 4),
            loss=round(float(metrics["loss"]), 4),
        )
        rows_out.append(row)
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(
            f"{name:12s} {variant:14s} {pairs}x{length} {step_s:8.4f} s/step "
            f"{row['tokens_per_s']:>11,.0f} tok/s  {row['model_tflops_per_s']:8.2f} TFLOP/s  "
            f"MFU {mfu}  (compile {compile_s:.0f} s)",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny random models, toy sizes, any backend"
    )
    p.add_argument("--models", default="smollm2-135m,llama-1b")
    p.add_argument("--length", type=int, default=512, help="tokens per row")
    p.add_argument("--pairs-135m", type=int, default=8)
    p.add_argument("--pairs-1b", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--chunk", type=int, default=128, help="fused-head token chunk")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense bf16)")
    p.add_argument("--budget-s", type=float, default=540.0, help="start nothing after this")
    args = p.parse_args()
    start = time.monotonic()
    models = {"smollm2-135m": SMOLLM2, "llama-1b": LLAMA_1B}
    paths = {"smollm2-135m": "tiny", "llama-1b": "tiny"}
    if os.path.isfile(os.path.join(ARTIFACT, "config.json")):
        models["smollm2-135m"] = LlamaConfig.from_dir(ARTIFACT)
        paths["smollm2-135m"] = ARTIFACT
    args.pairs = {"smollm2-135m": args.pairs_135m, "llama-1b": args.pairs_1b}
    if args.smoke:
        models = {
            "smollm2-135m": tiny_config(),
            "llama-1b": tiny_config(num_hidden_layers=3, rope_llama3=(8.0, 1.0, 4.0, 64)),
        }
        paths = dict.fromkeys(models, "tiny")
        args.pairs = dict.fromkeys(models, 1)
        args.length, args.steps, args.chunk = 32, 1, 16
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, args.peak_tflops)
    print(
        f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}; "
        f"peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} per device; "
        f"dtype {args.dtype}, remat {args.remat}, scan_layers {args.scan_layers}",
        flush=True,
    )
    if peak is not None:
        peak *= jax.device_count()  # the step runs data-parallel over every device
    rows: list[dict] = []
    for name in args.models.split(","):
        llama = models[name]
        src = "random init" if paths[name] == "tiny" else paths[name]
        print(f"## {name}: {matmul_params(llama) / 1e6:,.0f} M matmul parameters, {src}")
        bench_model(name, llama, paths[name], args, start + args.budget_s, peak, rows)
    print(json.dumps({"results": rows, "wall_s": round(time.monotonic() - start, 1)}))


if __name__ == "__main__":
    main()
