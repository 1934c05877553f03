"""One device mesh (`data`, `fsdp`, `tensor`) and the logical-axis rules that place arrays on it.

Code names logical axes only (`batch`, `vocab`, `embed`, `heads`, ...); the rules table in the
config maps each to mesh axes. A dimension that the mapped axes do not divide is replicated
(e.g. 3 KV heads on a tensor axis of 2), so any mesh runs any model.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rsa_jax.config import MESH_AXES, MeshConfig, mesh_shape

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when the environment describes several processes."""
    described = any(
        k in os.environ
        for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_ID")
    )
    if (
        described
        and int(os.environ.get("JAX_NUM_PROCESSES", os.environ.get("SLURM_NTASKS", 2))) > 1
    ):
        jax.distributed.initialize()
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh, the -1 axis filled, Auto axis types (GSPMD propagation)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(
    axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh, rules: dict
) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry the logical names `axes`."""
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mapped = [a for a in rules.get(name, []) if a not in used and mesh.shape[a] > 1]
        shards = int(np.prod([mesh.shape[a] for a in mapped])) if mapped else 1
        if not mapped or size % shards:
            spec.append(None)
            continue
        used.update(mapped)
        spec.append(mapped[0] if len(mapped) == 1 else tuple(mapped))
    return PartitionSpec(*spec)


def named(mesh: Mesh, spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
    """Rows over the `batch` rule's mesh axes, the length axis as the `length` rule says."""
    batch = [a for a in rules.get("batch", []) if mesh.shape[a] > 1]
    length = [a for a in rules.get("length", []) if mesh.shape[a] > 1 and a not in batch]

    def entry(axes):
        return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)

    return NamedSharding(mesh, PartitionSpec(entry(batch), entry(length)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's rows -> global arrays (`make_array_from_process_local_data`)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
