"""The exact selection behind `cvar_reference`, per key, on the blocks the risk head hands it.

`losses.kth_smallest_pair` (radix select with its sampled first digit and fused last pass)
against `losses.kth_smallest_pair_bisect` (the previous 32-pass bisection), both on [16, 24576]
float32 blocks (a row block's 8 positions x 2 vocabulary halves at V = 49152) inside a
`fori_loop`, as the head runs them, and vmapped over 2 members (a sweep). Two kinds of rows:
`normal` (log-ratio-like) and `mixture` (90% of the values with std 1e-3, 10% with std 1, where
the sampled first digit misses and the full first pass runs). Prints CPU nanoseconds per key and
the bisection's time over the radix select's, measured in this run.

    python bench/select_blocks.py
    python bench/select_blocks.py --steps 48 --repeats 3    # quicker
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rsa_jax import losses

G, W, BLOCKS = 16, 24576, 8


def _rows(kind: str, rng) -> jax.Array:
    shape = (BLOCKS, G, W)
    if kind == "mixture":
        small = rng.random(shape) < 0.9
        x = np.where(small, 1e-3 * rng.normal(size=shape), rng.normal(size=shape))
    else:
        x = 0.1 * rng.normal(size=shape) - 0.01
    return jnp.asarray(x.astype(np.float32))


def _looped(select, steps: int):
    """`steps` selections of 16 rows, cycling through the blocks (ranks vary a little)."""
    valid = jnp.ones((G, W), bool)

    def run(xs, k0):
        def body(j, acc):
            x = jax.lax.dynamic_index_in_dim(xs, j % BLOCKS, axis=0, keepdims=False)
            lo, hi = select(x, k0 + j % 7, valid)
            return acc + lo - hi

        return jax.lax.fori_loop(0, steps, body, jnp.zeros((G,), jnp.float32))

    return run


def _cpu_seconds(fn, args, repeats: int) -> tuple[float, np.ndarray]:
    out = np.asarray(jax.block_until_ready(fn(*args)))
    times = []
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.process_time() - start)
    return float(np.median(times)), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=96, help="16-row selections per timed call")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    k0 = jnp.full((G,), int(0.05 * W), jnp.int32)  # the 5% tail of cvar_reference at mu = 0.95
    results = {}
    print(f"jax {jax.__version__} on {jax.default_backend()}; [{G}, {W}] blocks, CPU ns per key")
    print("| rows | program | radix | bisection | bisection / radix |")
    print("|---|---|---|---|---|")
    for kind in ("normal", "mixture"):
        xs = _rows(kind, rng)
        for program in ("plain", "vmap2"):
            timed = {}
            outs = {}
            for name, select in (
                ("radix", losses.kth_smallest_pair),
                ("bisection", losses.kth_smallest_pair_bisect),
            ):
                run = _looped(select, args.steps)
                if program == "vmap2":
                    fn = jax.jit(jax.vmap(run, in_axes=(0, None)))
                    call = (jnp.stack([xs, 0.5 * xs]), k0)
                else:
                    fn, call = jax.jit(run), (xs, k0)
                seconds, outs[name] = _cpu_seconds(fn, call, args.repeats)
                keys = args.steps * G * W * (2 if program == "vmap2" else 1)
                timed[name] = seconds / keys * 1e9
            same = bool(np.array_equal(outs["radix"], outs["bisection"]))
            ratio = timed["bisection"] / timed["radix"]
            print(
                f"| {kind} | {program} | {timed['radix']:.2f} | {timed['bisection']:.2f} "
                f"| {ratio:.2f} (same results: {same}) |",
                flush=True,
            )
            results[f"{kind}_{program}_radix_ns_per_key"] = round(timed["radix"], 3)
            results[f"{kind}_{program}_bisection_over_radix"] = round(ratio, 3)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
