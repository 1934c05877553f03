"""One process of the two-process check in test_multihost.py (run as a script, not collected).

Each process builds its host block, JAX assembles the global [2B, L] arrays over a 2 x 2 CPU-device
mesh, and the process checks the gathered global batch against the single-host batch.
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: int, process_id: int, data_path: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from rsa_jax.data import DataConfig, make_pair_iterator, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer()
    config = DataConfig(
        path=data_path,
        view="pairs",
        template="USER: {prompt} ASSISTANT:",
        batch_size=4,
        max_prompt_len=16,
        max_response_len=32,
        response_buckets=(8, 32),
        sort_window=2,
    )
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local, _ = make_pair_iterator(config, tokenizer, process_index=process_id, process_count=2)
    single, _ = make_pair_iterator(config, tokenizer)
    steps = 0
    for block, whole in zip(local, single, strict=True):
        for key, value in whole.items():
            global_array = jax.make_array_from_process_local_data(sharding, block[key])
            assert global_array.shape == value.shape, (key, global_array.shape, value.shape)
            gathered = multihost_utils.process_allgather(global_array, tiled=True)
            np.testing.assert_array_equal(gathered, value)
        steps += 1
    assert steps == 3, steps
    print(f"process {process_id}: {steps} global batches match", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
