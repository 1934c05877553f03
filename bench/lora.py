"""LoRA / QLoRA memory benchmark, part 1: the frozen base's parameter bytes in each storage and
the adapter sizes, for SmolLM2-135M (artifacts/smollm2-135m, converted once from the bundled
GGUF if missing).

For each base storage (float32, bfloat16, int8, nf4; int8/nf4 quantize the seven projections in
blocks of 64 with float32 scales and keep embeddings and norms in bfloat16) it reports the base's
bytes counted from the arrays (4-bit codes packed two per byte), the bytes XLA assigns to the base
as a jit argument (`Compiled.memory_analysis().argument_size_in_bytes`, the ground truth for
packing), bytes per base parameter (over the float model's parameter count) and per projection
parameter (the quantized part; embeddings dominate the rest at this size); then the
adapter parameter counts and float32 bytes at rank 8 and 16 on all seven projections. Ratios
are against float32 measured in the same run.

Part 2 (the training engine; `--part 2`): one RSA step (ra_dpo + cvar_reference, fused head)
on 4 pairs x 128 tokens for full fine-tuning (float32 master weights, AdamW, a second model as
the reference), LoRA (bfloat16 base) and QLoRA (nf4 base), rank 8 on all seven projections, each
compiled by the engine as it trains: XLA's compiled peak memory
(`memory_analysis().peak_memory_in_bytes`), the trained state + frozen inputs' bytes (policy,
optimizer state, reference or base) per base parameter, and the median step time. Then an
adapter sweep: K=8 LoRA variants as one vmapped step (base passed once, adapters, moments and
hyperparameters stacked) against 8 sequential LoRA steps sharing one compiled step: wall time,
peak memory and the sweep's parameter + optimizer bytes (XLA's argument bytes less the batch and
the hyperparameters) over one base plus 8 adapter states. Last, a projection of those bytes
per parameter to a 7B model (state and frozen inputs only, no activations) against one 80 GB
accelerator and a TPU v5p-8 (4 chips x 95 GB HBM). The last line is one JSON object.

Part 3 (`--part 3`): what quantizing the base costs the model itself, before any training:
the held-out next-token loss (nats per token) of the base in each storage, and the KL from the
float32 model's next-token distribution (mean over tokens of KL(p_f32 || p_storage)), on
paragraphs of this repository's docs (English text the model never saw), `--tokens` tokens per
sequence. This is the gap a QLoRA run's adapters start from, and what the float-base merge of
its adapters (`rsa-jax export --base`) is measured against.

    python bench/lora.py                 # parts 1 and 2; part 2 takes minutes on 2 CPU cores
    python bench/lora.py --part 2        # the engine comparison only
    python bench/lora.py --part 3        # nf4 / int8 / bfloat16 cost in loss and KL
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsa_jax.models import (
    PROJECTIONS,
    STORAGES,
    LoraConfig,
    bundled_smollm2_gguf,
    convert_gguf,
    load_hf,
    param_count,
    split_lora,
    to_lora,
    tree_bytes,
)

ARTIFACT = os.path.join(os.path.dirname(__file__), "..", "artifacts", "smollm2-135m")


def _xla_argument_bytes(tree) -> int:
    compiled = jax.jit(lambda t: 0, keep_unused=True).lower(tree).compile()
    return int(compiled.memory_analysis().argument_size_in_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=ARTIFACT)
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--part", default="1,2", help="which parts to run: 1, 2 or 1,2")
    parser.add_argument("--k", type=int, default=8, help="variants of the adapter sweep")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--tokens", type=int, default=128, help="part 3: tokens per sequence")
    parser.add_argument("--sequences", type=int, default=16, help="part 3: held-out sequences")
    args = parser.parse_args()
    if args.model == ARTIFACT and not os.path.exists(os.path.join(ARTIFACT, "config.json")):
        convert_gguf(bundled_smollm2_gguf(), ARTIFACT)
    parts = {int(p) for p in args.part.split(",")}
    summary = part_one(args) if 1 in parts else {}
    if 2 in parts:
        summary.update(part_two(args))
    if 3 in parts:
        summary.update(part_three(args))
    print(json.dumps(summary))


def part_one(args) -> dict:
    rows, n_params, n_proj = {}, None, None
    for storage in STORAGES:
        model = load_hf(args.model)
        if n_params is None:
            n_params = param_count(nnx.state(model, nnx.Param))
        lora = LoraConfig(rank=8, base_storage=storage, block_size=args.block_size)
        _, base, _ = split_lora(to_lora(model, lora, rngs=nnx.Rngs(0)))
        counted, xla = tree_bytes(base), _xla_argument_bytes(base)
        proj = {k: v for k, v in base.items() if k.rsplit("/", 1)[-1] in PROJECTIONS}
        if n_proj is None:  # float32 comes first: its projection arrays are the parameters
            n_proj = param_count(proj)
        rows[storage] = dict(
            bytes=counted,
            xla_bytes=xla,
            bytes_per_param=counted / n_params,
            projection_bytes_per_param=tree_bytes(proj) / n_proj,
        )
        del model, base

    print(f"base: {args.model}, {n_params:,} parameters; int8/nf4 blocks of {args.block_size}")
    print(f"{'storage':<10}{'bytes':>14}{'XLA arg bytes':>16}{'bytes/param':>13}{'vs f32':>8}"
          f"{'projections B/param':>21}")  # fmt: skip
    for storage, row in rows.items():
        ratio = row["bytes"] / rows["float32"]["bytes"]
        print(
            f"{storage:<10}{row['bytes']:>14,}{row['xla_bytes']:>16,}"
            f"{row['bytes_per_param']:>13.3f}{ratio:>8.3f}"
            f"{row['projection_bytes_per_param']:>21.4f}"
        )

    adapters = {}
    for rank in [int(r) for r in args.ranks.split(",")]:
        model = load_hf(args.model)
        lora = LoraConfig(rank=rank, targets=PROJECTIONS, base_storage="float32")
        _, _, ad = split_lora(to_lora(model, lora, rngs=nnx.Rngs(0)))
        count = param_count(ad)
        adapters[rank] = dict(params=count, bytes=4 * count, fraction=count / n_params)
    print(f"\nadapters on {', '.join(PROJECTIONS)} (float32)")
    print(f"{'rank':<6}{'params':>14}{'bytes':>14}{'of base':>10}")
    for rank, row in adapters.items():
        print(f"{rank:<6}{row['params']:>14,}{row['bytes']:>14,}{row['fraction']:>10.4%}")

    summary = {
        "base_params": n_params,
        **{f"{s}_bytes_per_param": round(r["bytes_per_param"], 4) for s, r in rows.items()},
        **{
            f"{s}_over_float32": round(r["bytes"] / rows["float32"]["bytes"], 4)
            for s, r in rows.items()
        },  # fmt: skip
        **{
            f"{s}_projection_bytes_per_param": round(r["projection_bytes_per_param"], 4)
            for s, r in rows.items()
        },  # fmt: skip
        **{f"adapter_params_rank{k}": r["params"] for k, r in adapters.items()},
    }
    return summary


# -- part 2 -----------------------------------------------------------------------------------
PAIRS, PROMPT, RESPONSE = 4, 64, 64  # 4 pairs x 128 tokens
GB = 1e9


def _config(model: str, mode: str):
    from rsa_jax.config import load_config

    overrides = [
        f"model.path={model}",
        "model.compute_dtype=bfloat16",
        "model.remat=true",
        "model.scan_layers=true",  # one compiled layer: compile time independent of depth
        f"data.batch_size={PAIRS}",
        f"data.max_prompt_len={PROMPT}",
        f"data.max_response_len={RESPONSE}",
        "stages.0.loss=ra_dpo",
        "stages.0.risk=cvar_reference",
    ]
    if mode != "full":
        storage = {"lora": "bfloat16", "qlora": "nf4"}[mode]
        overrides += ["model.lora.rank=8", f"model.lora.base_storage={storage}"]
    return load_config(None, overrides)


def _batch(vocab: int, seed: int = 0) -> dict:
    """[2B, L] rows (B chosen, then B rejected), the response half loss-masked."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, length = 2 * PAIRS, PROMPT + RESPONSE
    ids = rng.integers(0, vocab, (rows, length), dtype=np.int32)
    ids[PAIRS:, :PROMPT] = ids[:PAIRS, :PROMPT]  # a pair shares its prompt
    loss_mask = np.zeros((rows, length), bool)
    loss_mask[:, PROMPT - 1 : -1] = True
    return dict(
        input_ids=ids,
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        attention_mask=np.ones((rows, length), bool),
        labels=np.roll(ids, -1, axis=1),
        loss_mask=loss_mask,
    )


def _time(fn, repeats: int) -> float:
    import statistics
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(model: str, mode: str, repeats: int) -> dict:
    """One engine step of `mode`: compiled peak, state + frozen bytes, median step time."""
    from rsa_jax.training import Engine, device_copy, state_shardings

    engine = Engine(_config(model, mode), check_devices=False)
    lora = engine.model.lora is not None
    initial = engine.initial
    reference = engine.frozen(None) if lora else initial
    state = engine.new_state(device_copy(initial))
    objective = engine.objective(engine.config.stages[0])
    step = engine.compiled_step(objective, state_shardings(state))
    batch = engine.place(_batch(engine.model.llama.vocab_size))
    hyper = engine.hyper(engine.config.stages[0], 100)
    compiled = step.lower(state, reference, batch, hyper).compile()
    mem = compiled.memory_analysis()
    full = engine.model.full or engine.model
    n_base = param_count(full.abstract_params())
    held = tree_bytes(state) + tree_bytes(reference)

    box = [state]

    def one():
        box[0], metrics = step(box[0], reference, batch, hyper)
        return metrics["loss"]

    jax.block_until_ready(one())  # the first call pays dispatch set-up
    seconds = _time(one, repeats)
    out = dict(
        peak=int(mem.peak_memory_in_bytes),
        temp=int(mem.temp_size_in_bytes),
        held=held,
        adapter_state=tree_bytes(box[0]) if lora else None,
        base=tree_bytes(engine.base) if lora else None,
        bytes_per_param=held / n_base,
        seconds=seconds,
        n_base=n_base,
    )
    if mode == "lora":
        out["engine"], out["state"], out["reference"] = engine, box[0], reference
        out["batch"], out["hyper"], out["step"] = batch, hyper, step
    return out


def _sweep(lora: dict, k: int, repeats: int) -> dict:
    """K stacked LoRA variants in one vmapped step vs K sequential steps of the LoRA step."""
    import jax.numpy as jnp

    from rsa_jax.training import TrainState

    engine, single, reference = lora["engine"], lora["state"], lora["reference"]
    batch, hyper = lora["batch"], lora["hyper"]
    stacked = jax.tree.map(lambda x: jnp.stack([x] * k), single)
    stacked = TrainState(stacked.params, stacked.opt_state, jnp.zeros((k,), jnp.int32))
    hypers = jax.tree.map(lambda x: jnp.stack([x] * k), hyper)
    step = engine.vmapped_step(engine.objective(engine.config.stages[0]), None)
    compiled = step.lower(stacked, reference, batch, hypers).compile()
    mem = compiled.memory_analysis()
    arguments = int(mem.argument_size_in_bytes) - tree_bytes(batch) - tree_bytes(hypers)
    expected = lora["base"] + k * lora["adapter_state"]
    box = [stacked]

    def sweep_step():
        box[0], metrics = step(box[0], reference, batch, hypers)
        return metrics["loss"]

    jax.block_until_ready(sweep_step())
    sweep_seconds = _time(sweep_step, repeats)
    states = [jax.tree.map(jnp.copy, single) for _ in range(k)]
    seq_step = lora["step"]

    def sequential():
        out = []
        for i in range(k):  # K runs one after the other, one compiled step
            states[i], metrics = seq_step(states[i], reference, batch, hyper)
            out.append(metrics["loss"])
        return out

    jax.block_until_ready(sequential())
    seq_seconds = _time(sequential, repeats)
    return dict(
        peak=int(mem.peak_memory_in_bytes),
        state=arguments,
        expected=expected,
        seconds=sweep_seconds,
        sequential_seconds=seq_seconds,
    )


def part_two(args) -> dict:
    rows = {mode: _measure(args.model, mode, args.repeats) for mode in ("full", "lora", "qlora")}
    n_base = rows["full"]["n_base"]
    print(f"\npart 2: one RSA step, {PAIRS} pairs x {PROMPT + RESPONSE} tokens, {n_base:,} params")
    print(f"{'mode':<8}{'peak MB':>10}{'temp MB':>10}{'state+frozen MB':>17}{'B/param':>9}"
          f"{'peak vs full':>14}{'step s':>9}")  # fmt: skip
    full = rows["full"]
    for mode, r in rows.items():
        print(
            f"{mode:<8}{r['peak'] / 1e6:>10.1f}{r['temp'] / 1e6:>10.1f}{r['held'] / 1e6:>17.1f}"
            f"{r['bytes_per_param']:>9.3f}{r['peak'] / full['peak']:>14.3f}{r['seconds']:>9.3f}"
        )
    sweep = _sweep(rows["lora"], args.k, args.repeats)
    k = args.k
    print(f"\nadapter sweep, K={k} LoRA variants on one bfloat16 base")
    print(f"  vmapped step: {sweep['seconds']:.3f} s, peak {sweep['peak'] / 1e6:.1f} MB")
    print(f"  {k} sequential steps (one compiled step): {sweep['sequential_seconds']:.3f} s, "
          f"peak {rows['lora']['peak'] / 1e6:.1f} MB each")  # fmt: skip
    print(f"  parameter + optimizer bytes: {sweep['state'] / 1e6:.1f} MB vs one base + {k} "
          f"adapter states {sweep['expected'] / 1e6:.1f} MB")  # fmt: skip

    print("\n7B projection (state and frozen inputs only, no activations; bytes/param as above)")
    print(f"{'mode':<8}{'GB':>8}{'one 80 GB':>11}{'v5p-8 (4x95 GB)':>17}")
    projection = {}
    for mode, r in rows.items():
        need = 7e9 * r["bytes_per_param"] / GB
        projection[mode] = round(need, 1)
        fits = "fits" if need < 80 else "no"
        fits_pod = "fits" if need < 4 * 95 else "no"
        print(f"{mode:<8}{need:>8.1f}{fits:>11}{fits_pod:>17}")
    return {
        "lora_over_full_memory": round(rows["lora"]["peak"] / full["peak"], 4),
        "qlora_over_full_memory": round(rows["qlora"]["peak"] / full["peak"], 4),
        "lora_over_full_state": round(rows["lora"]["held"] / full["held"], 4),
        "qlora_over_full_state": round(rows["qlora"]["held"] / full["held"], 4),
        **{f"{m}_state_bytes_per_param": round(r["bytes_per_param"], 4) for m, r in rows.items()},
        **{f"{m}_step_seconds": round(r["seconds"], 4) for m, r in rows.items()},
        "adapter_sweep_k": k,
        "adapter_sweep_state_over_expected": round(sweep["state"] / sweep["expected"], 4),
        "adapter_sweep_time_over_sequential": round(
            sweep["seconds"] / sweep["sequential_seconds"], 4
        ),
        "adapter_sweep_peak_over_lora_peak": round(sweep["peak"] / rows["lora"]["peak"], 4),
        **{f"projection_7b_{m}_gb": v for m, v in projection.items()},
    }


def _held_out_ids(tokenizer, n: int, length: int) -> np.ndarray:
    """[n, length] token ids: consecutive windows of the repository's docs text."""
    docs = os.path.join(os.path.dirname(__file__), "..", "docs")
    text = "\n\n".join(
        open(os.path.join(docs, name), encoding="utf-8").read()
        for name in sorted(os.listdir(docs))
        if name.endswith(".md")
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        raise SystemExit(f"docs hold {len(ids)} tokens, fewer than {n} x {length}")
    return np.asarray(ids[: n * length], np.int32).reshape(n, length)


def part_three(args) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = _held_out_ids(tokenizer, args.sequences, args.tokens)
    positions = np.tile(np.arange(args.tokens, dtype=np.int32), (ids.shape[0], 1))
    mask = np.ones_like(ids, bool)

    def log_probs(storage: str) -> np.ndarray:
        model = load_hf(args.model)
        lora = LoraConfig(rank=1, base_storage=storage, block_size=args.block_size)
        spec, base, _ = split_lora(to_lora(model, lora, rngs=nnx.Rngs(0)))

        @jax.jit
        def run(base, ids, positions, mask):  # the base alone (adapters off): a QLoRA reference
            module = spec.module(base)
            hidden = module(ids, positions, mask)
            return jax.nn.log_softmax(module.logits(hidden).astype(jnp.float32), axis=-1)

        out = [
            np.asarray(run(base, ids[i : i + 4], positions[i : i + 4], mask[i : i + 4]))
            for i in range(0, len(ids), 4)
        ]
        return np.concatenate(out)  # [N, T, V]

    rows, reference = {}, None
    for storage in ("float32", "bfloat16", "int8", "nf4"):
        logp = log_probs(storage)
        nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
        row = dict(loss=float(nll.mean()))
        if reference is None:
            reference = logp
        else:
            kl = np.sum(np.exp(reference) * (reference - logp), axis=-1)
            row.update(kl=float(kl.mean()), kl_p99=float(np.quantile(kl, 0.99)))
            row["loss_increase"] = row["loss"] - rows["float32"]["loss"]
        rows[storage] = row
        print(
            f"{storage:<10} loss {row['loss']:.4f} nats/token"
            + (
                f"  ({row['loss_increase']:+.4f})  KL from float32 {row['kl']:.4f} "
                f"(p99 {row['kl_p99']:.4f})"
                if "kl" in row
                else ""
            ),
            flush=True,
        )
    print(
        f"held-out: {ids.shape[0]} x {ids.shape[1]} tokens of docs/*.md; int8/nf4 blocks of "
        f"{args.block_size}"
    )
    return {f"quant_cost_{k}": v for k, v in rows.items()}


if __name__ == "__main__":
    main()
