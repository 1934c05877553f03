"""Run in a subprocess (libtpu loaded, no TPU present): the risk head's loops over row blocks and
selection groups keep each chip on its own rows (`row_shards`), in a program the TPU compiler
builds for the 32 chips of a v5p-64.

The gradient of `fused_pair_loss` with `cvar_reference` (the head with a selection) is compiled
with its 64 rows split over the 32 chips, once with `row_shards=32` and once with `row_shards=1`,
which is what the library did before: 8 rows per block step, fewer than the chips, so SPMD put
part of the rows' sharding on the loop's step axis and all-gathered the whole chunk of logits at
every step (16 TB per chip per step for Llama-3-70B on 64 chips, docs/scale.md). Prints one JSON
line: per program, the all-gather bytes per chip per call (`rsa_jax.compile.collectives`, loop
trip counts included) and how many all-gathers return a float array. Argument: "plain" or "vmap"
(the loss vmapped over two values of mu, as a sweep's variants are)."""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles may hold libtpu's lock
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-64")  # quiets libtpu's environment probing

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from rsa_jax.compile import collectives, topology_devices  # noqa: E402
from rsa_jax.losses import fused_pair_loss  # noqa: E402

CHIPS, B, T, D, V, CHUNK = 32, 32, 32, 128, 2048, 8


def loss_fn(shards: int):
    def total(h, w, hr, wr, labels, mask, mu):
        losses, _ = fused_pair_loss(
            h,
            w,
            hr,
            wr,
            labels,
            mask,
            loss="ra_dpo",
            risk="cvar_reference",
            mu=mu,
            chunk_size=CHUNK,
            row_shards=shards,
        )
        return jnp.sum(losses)

    return jax.value_and_grad(total, argnums=(0, 1))


def gathers(hlo: str) -> tuple[float, int]:
    """(all-gather bytes per chip per call, loop trip counts included; how many all-gathers
    return a float array: the logits of a block, in the old programs)."""
    colls = collectives(hlo, {"rows": CHIPS})
    total = sum(b for (kind, _), b in colls.bytes.items() if kind == "all-gather")
    results = re.findall(r"=\s*(.*?)\s+all-gather(?:-start)?\(", hlo)
    floats = sum(1 for r in results if re.search(r"\b(f32|bf16|f16)\[", r))
    return total, floats


def main():
    vmapped = sys.argv[1] == "vmap"
    devices = topology_devices("v5p-64")
    assert len(devices) == CHIPS, len(devices)
    mesh = Mesh(np.array(devices), ("rows",))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    whole = NamedSharding(mesh, PartitionSpec())
    n = 2 * B

    def spec(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    args = (
        spec((n, T, D), jnp.bfloat16, rows),
        spec((D, V), jnp.float32, whole),
        spec((n, T, D), jnp.bfloat16, rows),
        spec((D, V), jnp.float32, whole),
        spec((n, T), jnp.int32, rows),
        spec((n, T), jnp.bool_, rows),
        spec((2,) if vmapped else (), jnp.float32, whole),
    )
    out = {"chunk_bytes": n * CHUNK * V * 4}  # one [2B, C, V] float32 chunk of logits
    for shards in (1, CHIPS):
        fn = loss_fn(shards)
        if vmapped:
            fn = jax.vmap(fn, in_axes=(None,) * 6 + (0,))
        hlo = jax.jit(fn).lower(*args).compile().as_text()
        if os.environ.get("RSA_JAX_HLO_OUT"):  # the compiled HLO text, for reading
            with open(f"{os.environ['RSA_JAX_HLO_OUT']}.shards{shards}.hlo", "w") as f:
                f.write(hlo)
        total, floats = gathers(hlo)
        out[f"shards{shards}"] = {"all_gather_bytes": total, "float_gathers": floats}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
