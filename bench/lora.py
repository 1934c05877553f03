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
are against float32 measured in the same run. The step-time / peak-memory comparison of full
fine-tuning, LoRA and QLoRA and the adapter sweep need the training engine (not here yet).

    python bench/lora.py            # about a minute on 2 cores (mostly loading and quantizing)
"""

from __future__ import annotations

import argparse
import json
import os

import jax
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
    args = parser.parse_args()
    if args.model == ARTIFACT and not os.path.exists(os.path.join(ARTIFACT, "config.json")):
        convert_gguf(bundled_smollm2_gguf(), ARTIFACT)

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
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
