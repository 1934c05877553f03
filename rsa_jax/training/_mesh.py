"""One device mesh (`data`, `fsdp`, `tensor`) and the logical-axis rules that place arrays on it.

A multislice run (`mesh.slices` > 1) keeps the same three axes: `data` spans the slices (the
DCN), `fsdp` and `tensor` stay inside one (the ICI), as MaxText's hybrid `dcn_*` meshes do.

Code names logical axes only (`batch`, `vocab`, `embed`, `heads`, ...); the rules table in the
config maps each to mesh axes. A dimension that the mapped axes do not divide is replicated
(e.g. 3 KV heads on a tensor axis of 2), so any mesh runs any model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from contextlib import nullcontext

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rsa_jax.config import MESH_AXES, ConfigError, MeshConfig, mesh_shape
from rsa_jax.training._coordinator import coordinator_in_a_child
from rsa_jax.training._peers import (
    coordinator_grace,
    jax_heartbeat_timeout,
    peer_timeout,
    watch_peers,
)

log = logging.getLogger(__name__)


def distributed_request(environ=None) -> dict | None:
    """How this process should join a multi-process run, from the environment; None: it should not.

    - JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (the `launch/` scripts set
      them): explicit arguments to `jax.distributed.initialize`; JAX_NUM_PROCESSES=1 is one process.
    - a SLURM job of several tasks, an Open MPI job of several ranks, a TPU pod slice of several
      hosts (TPU_WORKER_HOSTNAMES, as on GKE), a multislice job (MEGASCALE_COORDINATOR_ADDRESS),
      or RSA_JAX_DISTRIBUTED=1 (what `launch/tpu_pod.sh` sets: on Cloud TPU VMs the worker list
      comes from the metadata server, not the environment): `{}`, i.e.
      `jax.distributed.initialize()` with no arguments (JAX reads the cluster).
    """
    env = os.environ if environ is None else environ
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = [n for n in names if env.get(n)]
    if given:
        if len(given) < len(names):
            missing = ", ".join(n for n in names if n not in given)
            raise ValueError(f"{', '.join(given)} set but not {missing}: set all three or none")
        num_processes, process_id = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        if not 0 <= process_id < num_processes:
            raise ValueError(f"JAX_PROCESS_ID={process_id} not in [0, {num_processes})")
        if num_processes == 1:
            return None
        return dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=num_processes,
            process_id=process_id,
        )
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if (
        env.get("RSA_JAX_DISTRIBUTED", "") == "1"  # opt-in: a Cloud TPU VM pod (JAX reads the
        or env.get("MEGASCALE_COORDINATOR_ADDRESS")  # pod from the metadata server), multislice
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        or len(hosts) > 1
    ):
        return {}
    return None


_initialized_here = False


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize` when the environment describes several processes, once.

    On the CPU, cross-process collectives go through gloo (set before initializing). Must run
    before anything touches a JAX backend (jax.devices(), an array). Starts the peer watch
    (`_peers.py`): a process that dies ends the others within RSA_JAX_PEER_TIMEOUT seconds.
    """
    global _initialized_here
    if _initialized_here or jax.distributed.is_initialized():
        return
    request = distributed_request()
    if request is None:
        return
    platforms = getattr(jax.config, "jax_platforms", None) or os.environ.get("JAX_PLATFORMS")
    platforms = platforms or ""
    if not platforms or "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    window = peer_timeout()  # a bad RSA_JAX_PEER_TIMEOUT fails before joining
    # Process 0 runs JAX's coordination service in a child process, so that its own death
    # reaches the others as a dead peer (`_coordinator.py`); RSA_JAX_COORDINATOR=in-process
    # keeps JAX's default (the service inside process 0).
    where = os.environ.get("RSA_JAX_COORDINATOR", "child")
    if where not in ("child", "in-process"):
        raise ValueError(f"RSA_JAX_COORDINATOR={where!r}: expected 'child' or 'in-process'")
    placed = (
        coordinator_in_a_child(coordinator_grace(window)) if where == "child" else nullcontext()
    )
    with placed:
        jax.distributed.initialize(
            **request, heartbeat_timeout_seconds=jax_heartbeat_timeout(window)
        )
    _initialized_here = True
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    watch_peers(window)  # a dead or departed peer ends this process within `window` seconds


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh, the -1 axis filled, Auto axis types (GSPMD propagation).

    With `config.slices` > 1 the data axis is slice-major: its first data/slices rows are the
    first slice's devices, and so on, so fsdp and tensor groups (and data groups within a
    slice) never leave a slice; only the data axis's reductions cross the DCN.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(config, len(devices))
    groups = slice_groups(devices, config.slices)
    per_slice = (shape[0] // config.slices, shape[1], shape[2])
    grid = np.concatenate([np.asarray(g, dtype=object).reshape(per_slice) for g in groups], axis=0)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def slice_groups(devices, slices: int) -> list[list]:
    """The devices split into `slices` slices, each in the given order.

    TPU devices of a multislice run carry `slice_index`: grouped by it, and the count of slices
    must be `slices`. Devices without it (CPU, GPU, simulated devices) are cut into `slices`
    consecutive runs, which is how a test lays out a multislice mesh on one host.
    """
    indices = [getattr(d, "slice_index", None) for d in devices]
    if any(i is None for i in indices):
        if len(devices) % slices:
            raise ConfigError(
                f"mesh.slices: {slices} slices do not divide the {len(devices)} devices"
            )
        n = len(devices) // slices
        return [list(devices[i * n : (i + 1) * n]) for i in range(slices)]
    found = sorted({int(i) for i in indices if i is not None})
    if len(found) != slices:
        raise ConfigError(
            f"mesh.slices: the config says {slices} slice(s) but the {len(devices)} devices lie "
            f"in {len(found)} (slice_index {found}); set mesh.slices={len(found)}"
        )
    groups = [[d for d, i in zip(devices, indices, strict=True) if i == s] for s in found]
    if len({len(g) for g in groups}) != 1:
        sizes = [len(g) for g in groups]
        raise ConfigError(f"mesh.slices: the slices hold different device counts {sizes}")
    return groups


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


def batch_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
    """Rows over the `batch` rule's mesh axes, the length axis as the `length` rule says."""
    batch = [a for a in rules.get("batch", []) if mesh.shape[a] > 1]
    length = [a for a in rules.get("length", []) if mesh.shape[a] > 1 and a not in batch]

    def entry(axes):
        return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)

    return NamedSharding(mesh, PartitionSpec(entry(batch), entry(length)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class Layout:
    """The mesh and the logical-axis rules together: where every array of a run lives."""

    mesh: Mesh
    rules: dict

    def __hash__(self):  # rules is a dict: hash its items (a Layout keys compiled-step caches)
        return hash((self.mesh, tuple((k, tuple(v)) for k, v in sorted(self.rules.items()))))

    @classmethod
    def single_device(cls, rules: dict, device=None) -> Layout:
        """A 1x1x1 mesh on one device (the first by default)."""
        from rsa_jax.config import MeshConfig

        device = jax.devices()[0] if device is None else device
        return cls(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), [device]), rules)

    @functools.cached_property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @functools.cached_property
    def batch(self) -> NamedSharding:
        return batch_sharding(self.mesh, self.rules)

    @functools.cached_property
    def row_shards(self) -> int:
        """How many devices a batch's rows are split over (the `batch` rule's mesh axes)."""
        rows = self.batch.spec[0] if len(self.batch.spec) else None
        axes = () if rows is None else (rows,) if isinstance(rows, str) else tuple(rows)
        return int(np.prod([self.mesh.shape[a] for a in axes], dtype=np.int64))

    @functools.cached_property
    def microbatches(self) -> NamedSharding:
        """[K, rows, L] microbatches of a batch: each microbatch's rows as `batch` lays rows."""
        return NamedSharding(self.mesh, PartitionSpec(None, *self.batch.spec))

    def sharding(self, axes: tuple[str | None, ...] | None, shape: tuple[int, ...]):
        """NamedSharding of an array whose dimensions carry the logical names `axes`."""
        return NamedSharding(self.mesh, logical_spec(axes, shape, self.mesh, self.rules))


def place_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's rows -> global arrays (`make_array_from_process_local_data`)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
