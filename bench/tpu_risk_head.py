"""What the TPU compiler makes of the risk head: the radix select against a sort, on a TPU topology.

Compiles with libtpu's compiler (no TPU needed: `pip install rsa-jax[tpu-compile]`), on one chip of
the named topology, and reads the compiled programs: per-chip memory (XLA's buffer assignment,
`memory_analysis`: arguments + outputs + temporaries), HLO instruction count, `while` loops and
`sort`s in the HLO text, and the compile time. Programs:

- `select`: the k-th and (k+1)-th smallest of each row of [N, V] float32, as `cvar_reference` needs
  per position: `losses.kth_smallest_pair` (radix select: data-dependent loops of histogram
  scatters), `losses.kth_smallest_pair_bisect` (32 compare-and-count passes), and
  `losses.kth_smallest_pair_sort` (one sort of the row's keys, then two gathers; the same bits).
- `fused` and `logits`: the whole Ra-DPO + cvar_reference head, loss and gradient
  (`fused_pair_loss` / `logits_pair_loss`), with the radix select and with the sort in its place.

Ratios are against the radix select (or the head with it), compiled in the same run.

    python bench/tpu_risk_head.py                       # v5p-8, V = 32000 (Llama-2)
    python bench/tpu_risk_head.py --topology v5e-4 --vocab 128256 --rows 256
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from rsa_jax import losses  # noqa: E402
from rsa_jax.losses import _risk  # noqa: E402 - the bench swaps the selection the head calls

# name -> get_topology_desc arguments for one slice (the chips of one host are enough here).
TOPOLOGIES = {
    "v5p-8": dict(topology_name="v5p:2x2x1", chip_config_name="megacore", bounds=(2, 2, 1)),
    "v5e-4": dict(topology_name="v5e:2x2", chip_config_name="default", bounds=(2, 2, 1)),
    "v6e-4": dict(topology_name="v6e:2x2", chip_config_name="default", bounds=(2, 2, 1)),
}


SELECTS = {
    "radix": losses.kth_smallest_pair,
    "bisect": losses.kth_smallest_pair_bisect,
    "sort": losses.kth_smallest_pair_sort,
}


def read(compiled, seconds: float) -> dict:
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    lines = [line for line in hlo.splitlines() if re.match(r"\s*(ROOT )?%\S+ = ", line)]
    return dict(
        gib=(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
        / 2**30,
        temp_gib=mem.temp_size_in_bytes / 2**30,
        instructions=len(lines),
        whiles=sum(1 for line in lines if re.search(r"\swhile\(", line)),
        sorts=sum(1 for line in lines if re.search(r"\ssort\(", line)),
        compile_s=seconds,
    )


def compile_on(device, fn, *shapes) -> dict:
    sharding = NamedSharding(Mesh(np.asarray([device]), ("x",)), PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return read(compiled, time.perf_counter() - t)


def select_program(select):
    def run(x, k, valid):
        return select(x, k, valid)

    return run


def head_program(head: str, chunk: int):
    def run(h, w, hr, wr, labels, mask):
        def total(h, w):
            kw = dict(loss="ra_dpo", risk="cvar_reference", alpha=0.5, mu=0.95)
            if head == "fused":
                out, _ = losses.fused_pair_loss(h, w, hr, wr, labels, mask, chunk_size=chunk, **kw)
            else:
                out, _ = losses.logits_pair_loss(h @ w, hr @ wr, labels, mask, **kw)
            return jnp.sum(out)

        return jax.value_and_grad(total, argnums=(0, 1))(h, w)

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default="v5p-8", choices=sorted(TOPOLOGIES))
    p.add_argument("--rows", type=int, default=512, help="positions N of the select program")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--pairs", type=int, default=2, help="pairs B of the head programs")
    p.add_argument("--length", type=int, default=512, help="tokens T of the head programs")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=losses.DEFAULT_CHUNK_SIZE)
    args = p.parse_args()
    t = TOPOLOGIES[args.topology]
    device = topologies.get_topology_desc(
        platform="tpu",
        topology_name=t["topology_name"],
        chip_config_name=t["chip_config_name"],
        chips_per_host_bounds=t["bounds"],
        num_slices=1,
    ).devices[0]
    n, v = args.rows, args.vocab
    rows: dict[str, dict] = {}
    for name, select in SELECTS.items():
        shapes = [((n, v), jnp.float32), ((n,), jnp.int32), ((n, v), jnp.bool_)]
        rows[f"select/{name}"] = compile_on(device, select_program(select), *shapes)
    b2, length, d = 2 * args.pairs, args.length, args.hidden
    head_shapes = [
        ((b2, length, d), jnp.bfloat16),
        ((d, v), jnp.bfloat16),
        ((b2, length, d), jnp.bfloat16),
        ((d, v), jnp.bfloat16),
        ((b2, length), jnp.int32),
        ((b2, length), jnp.bool_),
    ]
    original = _risk.kth_smallest_pair
    for head in ("fused", "logits"):
        for name in ("radix", "sort"):
            _risk.kth_smallest_pair = SELECTS[name]
            try:
                program = head_program(head, args.chunk)
                rows[f"{head}/{name}"] = compile_on(device, program, *head_shapes)
            finally:
                _risk.kth_smallest_pair = original
    print(
        f"# {args.topology} ({device.device_kind}), select [N={n}, V={v}], heads B={args.pairs} "
        f"T={length} D={d} V={v} chunk={args.chunk}; ratios against the radix select's program"
    )
    header = "program", "GiB", "temp GiB", "instr", "while", "sort", "compile s", "GiB x", "instr x"
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, r in rows.items():
        base = rows[key.split("/")[0] + "/radix"]
        print(
            f"| {key} | {r['gib']:.3f} | {r['temp_gib']:.3f} | {r['instructions']} | "
            f"{r['whiles']} | {r['sorts']} | {r['compile_s']:.1f} | "
            f"{r['gib'] / base['gib']:.2f} | {r['instructions'] / base['instructions']:.2f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
