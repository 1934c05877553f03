"""One layer's GQA attention, forward+backward, in three layouts and with two CPU dot libraries,
all compiled in one process and timed alternately.

Layouts (SmolLM2-135M's heads: H=9 query heads over K=3 key/value heads, E=64, causal mask):
- `gqa`: `jax.nn.dot_product_attention` with [B, L, H, E] queries and [B, S, K, E] keys/values
  (the model's attention);
- `repeat`: the same call with keys/values repeated to H heads (no grouping inside jax);
- `grouped`: the einsums the model used before, queries as [B, L, K, G, E] and [B, K, G, L, S]
  scores.
Dots: `ynn` (jax 0.10.2's default, YNNPACK) or `eigen` (XLA's own,
`xla_cpu_experimental_ynn_fusion_type=""`). Loss: sum(out * W) for a fixed W, gradients with
respect to q, k and v. Prints milliseconds per forward+backward (median over repetitions of 10
calls) and each variant's time over the first; checks every variant against `gqa/ynn`.

    python bench/attention_layouts.py                   # 4 pairs x 128 tokens (8 rows)
    python bench/attention_layouts.py --rows 2 --length 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

DOTS = {"ynn": {}, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def layouts(allowed, groups: int):
    """name -> attention(q [B, L, H, E], k, v [B, S, K, E]) -> [B, L, H, E]."""

    def gqa(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")

    def repeat(q, k, v):
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return gqa(q, k, v)

    def grouped(q, k, v):
        b, length, h, e = q.shape
        qg = q.reshape(b, length, k.shape[2], groups, e)
        scores = jnp.einsum("blkge,bske->bkgls", qg, k) / math.sqrt(e)
        scores = jnp.where(allowed[:, None, None], scores, -0.7 * jnp.finfo(jnp.float32).max)
        weights = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bkgls,bske->blkge", weights, v).reshape(b, length, h, e)

    return {"gqa": gqa, "repeat": repeat, "grouped": grouped}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="B: 2 x pairs")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    b, length, h, kv, e = args.rows, args.length, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, length, h, e)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, length, kv, e)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(b, length, h, e)), jnp.float32)
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    compiled = {}
    for name, attend in layouts(allowed, h // kv).items():

        def value_and_grad(q, k, v, attend=attend):
            return jax.value_and_grad(lambda *a: jnp.sum(attend(*a) * w), (0, 1, 2))(q, k, v)

        lowered = jax.jit(value_and_grad).lower(q, k, v)
        for dots, options in DOTS.items():
            compiled[f"{name}/{dots}"] = lowered.compile(compiler_options=options)
    names = list(compiled)
    want = jax.tree.leaves(compiled[names[0]](q, k, v))
    diff = {}
    for name in names:
        got = jax.tree.leaves(compiled[name](q, k, v))
        diff[name] = max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(got, want, strict=True))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(10):
                jax.block_until_ready(compiled[name](q, k, v))
            times[name].append((time.perf_counter() - start) / 10)
    med = {n: statistics.median(t) for n, t in times.items()}
    for name in names:
        print(
            f"{name:14s} {med[name] * 1e3:8.2f} ms  x{med[name] / med[names[0]]:.3f}  "
            f"max |diff| {diff[name]:.1e}"
        )
    result = {
        "shape": [b, length, h, kv, e],
        "ms": {n: round(t * 1e3, 3) for n, t in med.items()},
        "over_first": {n: round(t / med[names[0]], 3) for n, t in med.items()},
        "max_abs_diff": diff,
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
