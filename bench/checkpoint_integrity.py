"""What checkpoint integrity costs: `Checkpoints.save` / `restore` (checksums computed, recorded,
verified) against plain Orbax saving and restoring the same tree in the same run.

The tree mimics a train state: float32 parameters and two Adam moments of the same shapes
(default 8M parameters, 96 MiB in all), sharded over the local devices along the first axis.
Reported, each the median of --repeats runs after one warm-up (which compiles the checksum):
the checksum pass alone, synchronous save + wait, and restore, as ratios to plain Orbax's save
and restore. On accelerators the checksum runs on the device; on the CPU it competes with the
write for the same cores.

    python bench/checkpoint_integrity.py                # 8M parameters
    python bench/checkpoint_integrity.py --params 2e6 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from rsa_jax.training import Checkpoints
from rsa_jax.training._checksum import tree_checksums


class _Iterator:
    def get_state(self):
        return {"position": 0}

    def set_state(self, state):
        pass


def make_tree(params: int, seed: int = 0) -> dict:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    rng = np.random.default_rng(seed)
    rows = max(len(jax.devices()), params // 1024 // len(jax.devices()) * len(jax.devices()))
    shapes = {"embed": (rows // 2, 1024), "mlp": (rows // 4, 1024), "attn": (rows // 4, 1024)}

    def leaf(shape):
        return jax.device_put(rng.standard_normal(shape, dtype=np.float32), sharding)

    return {
        part: {name: leaf(shape) for name, shape in shapes.items()} for part in ("p", "mu", "nu")
    }


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, first directory creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=8e6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tree = make_tree(int(args.params))
    n = sum(x.size for x in jax.tree.leaves(tree))
    print(f"tree: {n / 1e6:.1f}M float32 values ({n * 4 / 2**20:.0f} MiB), {jax.device_count()} "
          "device(s)")  # fmt: skip
    root = tempfile.mkdtemp(prefix="ckpt_bench_")
    try:
        step = iter(range(1, 10**6))

        plain = ocp.CheckpointManager(
            f"{root}/plain",
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
        )

        def plain_save():
            plain.save(next(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
            plain.wait_until_finished()

        ours = Checkpoints(f"{root}/ours", keep=2, async_save=False)

        def ours_save():
            ours.save(next(step), tree, meta={"done": False}, data_iter=_Iterator())
            ours.wait()

        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )

        def plain_restore():
            s = plain.latest_step()
            out = plain.restore(
                s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
            jax.block_until_ready(out["state"])

        def ours_restore():
            s, _ = ours.latest_meta()
            jax.block_until_ready(ours.restore(s, abstract, data_iter=None)[0])

        checksum = median_time(lambda: tree_checksums(tree), args.repeats)
        t_plain_save = median_time(plain_save, args.repeats)
        t_ours_save = median_time(ours_save, args.repeats)
        t_plain_restore = median_time(plain_restore, args.repeats)
        t_ours_restore = median_time(ours_restore, args.repeats)
        plain.close()
        ours.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"checksum pass           {checksum * 1e3:8.1f} ms  "
          f"({checksum / t_plain_save:.2f}x a plain save)")  # fmt: skip
    print(f"save + wait   plain {t_plain_save * 1e3:8.1f} ms  ours {t_ours_save * 1e3:8.1f} ms  "
          f"ratio {t_ours_save / t_plain_save:.2f}")  # fmt: skip
    print(f"restore       plain {t_plain_restore * 1e3:8.1f} ms  ours {t_ours_restore * 1e3:8.1f} "
          f"ms  ratio {t_ours_restore / t_plain_restore:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
