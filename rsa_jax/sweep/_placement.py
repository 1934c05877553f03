"""Where the K variants of a vmap sweep live: one device, or spread over a `variant` mesh axis.

Dimension legend: K variants, V devices along the `variant` axis (the sweep file's
`variant_devices`), D devices in all, M = D / V devices per variant group (the config's
`mesh`: data x fsdp x tensor).

The mesh is (variant, data, fsdp, tensor), variant outermost, so each group of M consecutive
devices holds K / V variants and is laid out exactly as a training run on M devices:

    stacked over K (each variant's own)     P('variant', *spec)   K / V slices per group
      policy parameters (full model or adapters), AdamW moments and counts, stage step,
      the reference of a `previous_stage` stage, the traced hyperparameters, the metrics
    shared by every variant                 P(*spec)              replicated over variant
      the frozen LoRA base, the initial model as a stage-1 reference, the batch

`spec` is the array's training sharding from the logical-axis rules (`mesh.rules`), which never
name `variant`; so a group shards the model over fsdp/tensor and the batch over data as a run
on M devices would. Memory per device: the shared arrays / (their shards over M), plus K / V
variants' stacked arrays / (their shards over M).

What XLA makes of it (the compiled step's collectives, counted on 8 simulated CPU devices): with
variant=4 x data=2 (LoRA), every collective stays within a variant group (13 per step, over
data). With variant=2 x fsdp=2 x tensor=2 (full model) the arrays stay where they are placed, but
the GSPMD partitioner of jax 0.10.2 also moves activations between groups (collective-permutes
and 3 all-gathers per step, with "involuntary full rematerialization" warnings). The remedy, a
`shard_map` manual over `variant` only, crashes that partitioner on the CPU
(spmd_partitioner_util.cc:497), so it is not used; on accelerators, prefer groups laid out by
data (and fsdp) until it is.

K must be a multiple of V (no padding: a padded variant would train for nothing); the sweep
file's check names `variant_devices` otherwise. Without `variant_devices` the sweep runs on one
device (the first of `jax.devices()`), as it always did: a 1x1x1x1 mesh, the same code.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rsa_jax.config import MESH_AXES, Config, ConfigError, mesh_shape, validate
from rsa_jax.sweep._file import SweepError
from rsa_jax.training import BATCH_KEYS, Engine, Layout, opt_state_shardings

VARIANT_AXIS = "variant"


@dataclasses.dataclass(frozen=True)
class VariantPlacement:
    """The (variant, data, fsdp, tensor) layout of K stacked variants; see the module docstring.

    `layout` is what the engine is built on: its rules shard every unstacked array as in
    training, replicated over `variant`; the methods here add the leading K axis on `variant`.
    """

    layout: Layout
    k: int

    @property
    def mesh(self) -> Mesh:
        return self.layout.mesh

    def describe(self) -> str:
        shape = ", ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
        where = str(self.mesh.devices.flat[0]) if self.mesh.size == 1 else f"mesh {{{shape}}}"
        return f"{self.k} variant(s) in one program on {where}"

    @functools.cached_property
    def variant(self) -> NamedSharding:
        """[K, ...] arrays split over the variant axis only (hyperparameters, metrics)."""
        return NamedSharding(self.mesh, PartitionSpec(VARIANT_AXIS))

    def stacked(self, sharding: NamedSharding) -> NamedSharding:
        """The sharding of K stacked copies of an array sharded as `sharding`."""
        return NamedSharding(self.mesh, PartitionSpec(VARIANT_AXIS, *sharding.spec))

    def unstacked(self, sharding: NamedSharding) -> NamedSharding:
        """One variant's slice of an array sharded as `stacked(s)`: `s` again."""
        spec = tuple(sharding.spec)
        assert spec and spec[0] == VARIANT_AXIS, spec
        return NamedSharding(self.mesh, PartitionSpec(*spec[1:]))

    # -- arrays -----------------------------------------------------------------------------
    def stack(self, tree):
        """K copies of every leaf of `tree` (placed on this mesh, as the engine places them),
        stacked on a leading axis split over `variant`."""
        out_sh = jax.tree.map(lambda x: self.stacked(x.sharding), tree)
        return jax.jit(_repeat, static_argnums=1, out_shardings=out_sh)(tree, self.k)

    def slice(self, tree, j: int):
        """Variant j's slice of a stacked tree, gathered from its variant group and sharded as
        one training run's arrays (what a checkpoint of a single run holds)."""
        out_sh = jax.tree.map(lambda x: self.unstacked(x.sharding), tree)
        # j traced (and `_take` one function): one program for the K slices.
        return jax.jit(_take, out_shardings=out_sh)(tree, jnp.int32(j))

    def opt_state(self, engine: Engine, policy):
        """The optimizer state of the stacked `policy` (`vmap(tx.init)`), created on its
        shardings: each moment as its parameter, the [K] counts over `variant`."""
        rep = engine.layout.replicated
        one = opt_state_shardings(engine.tx, engine.model.abstract_params(), rep)
        out_sh = jax.tree.map(self.stacked, one)
        return jax.jit(jax.vmap(engine.tx.init), out_shardings=out_sh)(policy)

    def steps(self):
        """The K stage-step counters, zero."""
        return jax.device_put(np.zeros((self.k,), np.int32), self.variant)

    def hyper(self, stacked_hyper):
        """The stacked [K] hyperparameters, split over `variant`."""
        return jax.device_put(stacked_hyper, self.variant)

    def step_shardings(self, engine: Engine, state, reference) -> tuple:
        """(in_shardings, out_shardings) of the vmapped step `(state, reference, batch, hyper)
        -> (state, metrics)` for this placement, from the placed arrays themselves."""
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        ref_sh = jax.tree.map(lambda x: x.sharding, reference)
        batch_sh = {k: engine.layout.batch for k in BATCH_KEYS}
        return (state_sh, ref_sh, batch_sh, self.variant), (state_sh, self.variant)


def variant_placement(
    config: Config, k: int, variant_devices: int | None, *, where: str, devices=None
) -> VariantPlacement:
    """The placement of `k` variants of `config`: one device when `variant_devices` is None,
    else a (variant_devices, data, fsdp, tensor) mesh over `devices` (default: all), the
    config's mesh filling the D / variant_devices devices of each group.

    Raises SweepError (prefixed by `where`, the sweep file) naming `variant_devices` or the
    config key when the devices, the variants or the batch do not divide.
    """
    if config.mesh.slices > 1:
        # The variant axis would have to cross the DCN; a sweep of K variants fits one slice.
        raise SweepError(f"{where}: mesh.slices: vmap sweeps run on one slice (set it to 1)")
    if variant_devices is None:
        device = jax.devices()[0] if devices is None else devices[0]
        grid = np.asarray([device]).reshape((1,) * (1 + len(MESH_AXES)))
        return VariantPlacement(_layout(grid, config), k)
    devices = jax.devices() if devices is None else devices
    d, v = len(devices), variant_devices
    if jax.process_count() > 1:
        # The pipeline gives each process its own rows; a variant axis across processes would
        # need every group to see every row. Not built: vmap sweeps run in one process.
        raise SweepError(f"{where}: variant_devices: vmap sweeps run in one process")
    if d % v:
        raise SweepError(
            f"{where}: variant_devices: {v} does not divide the {d} devices "
            f"({jax.devices()[0].platform})"
        )
    if k % v:
        raise SweepError(
            f"{where}: variant_devices: {v} does not divide the {k} variant(s) to train "
            "(each variant group holds K / variant_devices of them; no padding)"
        )
    try:
        shape = mesh_shape(config.mesh, d // v)
        validate(config, device_count=d // v)
    except ConfigError as e:
        raise SweepError(
            f"{where}: variant_devices: {v} leaves {d // v} device(s) per variant group for "
            f"the config's mesh, and then {e}"
        ) from None
    grid = np.asarray(devices).reshape((v, *shape))
    return VariantPlacement(_layout(grid, config), k)


def _repeat(tree, k: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (k, *x.shape)), tree)


def _take(tree, j):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False), tree)


def _layout(grid: np.ndarray, config: Config) -> Layout:
    axes = (VARIANT_AXIS, *MESH_AXES)
    return Layout(Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes)), config.mesh.rules)
