"""One process of the runs in test_multiprocess.py (run as a script, not collected).

    python multiprocess_worker.py DEVICES OUT_DIR CONFIG [OVERRIDES...]

Runs the real trainer on DEVICES simulated CPU devices; with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, the trainer joins the multi-process run itself
(`maybe_initialize_distributed`). Writes to OUT_DIR:
  rows_<process>.npz   the host block of every batch this process placed, in order
  params.npz           (process 0) the final policy parameters, gathered from all processes
"""

from __future__ import annotations

import os
import sys

import jax


def main(devices: int, out_dir: str, config_path: str, overrides: list[str]) -> None:
    jax.config.update("jax_num_cpu_devices", devices)
    import numpy as np
    from jax.experimental import multihost_utils

    from rsa_jax.config import load_config
    from rsa_jax.training import _engine, train

    blocks: list[dict[str, np.ndarray]] = []
    place_batch = _engine.place_batch

    def recording_place_batch(batch, sharding):
        blocks.append({k: np.array(v) for k, v in batch.items()})
        return place_batch(batch, sharding)

    _engine.place_batch = recording_place_batch  # what the engine's default `place` calls
    result = train(load_config(config_path, overrides))
    assert result.status == "done", result

    index, count = jax.process_index(), jax.process_count()
    os.makedirs(out_dir, exist_ok=True)
    np.savez(
        os.path.join(out_dir, f"rows_{index}.npz"),
        **{f"{t}/{k}": v for t, block in enumerate(blocks) for k, v in block.items()},
    )
    # A global array spanning other processes' devices cannot be fetched with device_get.
    params = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in result.params.items()}
    if index == 0:
        np.savez(os.path.join(out_dir, "params.npz"), **params)
    print(
        f"process {index} of {count} on {jax.device_count()} devices: {result.status} at global "
        f"step {result.global_step}, placed {len(blocks)} batches",
        flush=True,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
