"""Compiled peak memory of the loss head at Gemma 3's vocabulary: logits path against fused head.

The value-and-grad of the Ra-DPO loss (risk `kl`) with respect to the policy's hidden states and
unembedding, at V = 262,144 and the widths of Gemma 3 270M (D = 640) and 1B (D = 1152), float32.
Peak memory is XLA's buffer assignment of the compiled program (`memory_analysis()`: arguments +
temporaries + outputs); nothing is run, so the sizes need not fit this machine.

    python bench/gemma_head_memory.py                  # 8 pairs x 512 tokens, chunk 64
    python bench/gemma_head_memory.py --pairs 4 --seq 1024
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from rsa_jax.losses import fused_pair_loss, logits_pair_loss

GEMMA3_VOCAB = 262_144
WIDTHS = {"gemma-3-270m": 640, "gemma-3-1b": 1152}


def peak_mib(fn, shapes) -> tuple[float, float]:
    """(total, temporaries) MiB of the compiled `fn` on `shapes`."""
    m = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
    return total / 2**20, m.temp_size_in_bytes / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args(argv)
    kw = dict(loss="ra_dpo", risk="kl")

    def fused(h, w, rh, rw, y, m):
        return fused_pair_loss(h, w, rh, rw, y, m, chunk_size=args.chunk, **kw)[0].sum()

    def logits(h, w, rh, rw, y, m):
        lp, lr = (jnp.einsum("btd,dv->btv", a, b) for a, b in ((h, w), (rh, rw)))
        return logits_pair_loss(lp, lr, y, m, **kw)[0].sum()

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    n, t, v = 2 * args.pairs, args.seq, GEMMA3_VOCAB
    print(f"## V={v}, {args.pairs} pairs x {t} tokens, chunk {args.chunk}, float32")
    print("| model | D | logits peak MiB (temp) | fused peak MiB (temp) | fused / logits |")
    print("|---|---|---|---|---|")
    for name, d in WIDTHS.items():
        shapes = [
            jax.ShapeDtypeStruct(shape, dtype)
            for shape, dtype in (
                ((n, t, d), jnp.float32),
                ((d, v), jnp.float32),
                ((n, t, d), jnp.float32),
                ((d, v), jnp.float32),
                ((n, t), jnp.int32),
                ((n, t), jnp.bool_),
            )
        ]
        (lt, ltemp), (ft, ftemp) = (peak_mib(grad(f), shapes) for f in (logits, fused))
        print(
            f"| {name} | {d} | {lt:,.0f} ({ltemp:,.0f}) | {ft:,.0f} ({ftemp:,.0f}) "
            f"| {ft / lt:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
