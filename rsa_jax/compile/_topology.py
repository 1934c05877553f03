"""Cloud TPU slice names (`v5p-8`, `v6e-16`, ...) -> the topology libtpu's compiler builds on.

One table: the slice name's chip count, the topology string and chip configuration that
`jax.experimental.topologies.get_topology_desc` takes, chips per host, and each chip's HBM and
peak dense bf16 FLOP/s (Cloud TPU's published system specifications). v4 and v5p names count
TensorCores (two per chip, used as one "megacore" device), v5e and v6e names count chips.

`topology_devices(name, slices)` gives the devices of that many slices with no TPU present:
libtpu compiles for them (ahead-of-time), nothing runs on them.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from rsa_jax.config import ConfigError

GIB = 1024**3


class TopologyError(ConfigError):
    """An unknown slice name or slice count; the message lists what is known."""


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # the name prefix: v4, v5e, v5p, v6e
    platform_name: str  # the topology string's prefix libtpu knows
    chip_config: str  # "megacore" (two TensorCores as one device) or "default"
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # dense, per chip
    cores_in_name: int  # the slice name counts cores (2 per chip) or chips (1)


CHIPS = {
    "v4": Chip("v4", "v4", "megacore", 32 * GIB, 275e12, 2),
    "v5e": Chip("v5e", "v5e", "default", 16 * GIB, 197e12, 1),
    "v5p": Chip("v5p", "v5", "megacore", 95 * GIB, 459e12, 2),
    "v6e": Chip("v6e", "v6e", "default", 32 * GIB, 918e12, 1),
}

# chips -> torus shape: v4/v5p are 3-D, v5e/v6e 2-D; hosts hold 2x2 chips (4), one host below.
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
}
_SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str  # e.g. "v5p-8"
    chip: Chip
    chips: int
    topology: str  # e.g. "v5:2x2x1"
    chips_per_host: tuple[int, int, int]

    @property
    def hosts(self) -> int:
        per_host = self.chips_per_host[0] * self.chips_per_host[1] * self.chips_per_host[2]
        return max(1, self.chips // per_host)

    def describe(self) -> str:
        c = self.chip
        return (
            f"{self.name}: {self.chips} chip(s) ({self.topology}, {self.hosts} host(s)), "
            f"{c.hbm_bytes / GIB:.0f} GiB HBM and {c.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 "
            "per chip"
        )


def _table() -> dict[str, TpuSlice]:
    out = {}
    for chip in CHIPS.values():
        shapes = _SHAPES_3D if chip.platform_name in ("v4", "v5") else _SHAPES_2D
        for chips, shape in shapes.items():
            name = f"{chip.generation}-{chips * chip.cores_in_name}"
            per_host = (1, 1, 1) if chips == 1 else (2, 2, 1)
            out[name] = TpuSlice(name, chip, chips, f"{chip.platform_name}:{shape}", per_host)
    return out


TPU_SLICES: dict[str, TpuSlice] = _table()


def tpu_slice(name: str) -> TpuSlice:
    """The slice called `name`; TopologyError listing the known names otherwise."""
    found = TPU_SLICES.get(name.strip().lower())
    if found is None:
        known = ", ".join(TPU_SLICES)
        raise TopologyError(f"--topology {name!r} is not a known TPU slice; known: {known}")
    return found


def topology_devices(name: str, slices: int = 1) -> list:
    """The devices of `slices` slices of `name` for ahead-of-time compilation (libtpu); the
    same device objects on every call, so programs compiled for them stay in jax's caches."""
    tpu = tpu_slice(name)
    if slices < 1:
        raise TopologyError(f"--slices must be >= 1, got {slices}")
    return list(_devices(tpu, slices))


@functools.cache
def _devices(tpu: TpuSlice, slices: int) -> tuple:
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise TopologyError(f"jax.experimental.topologies: {e}") from None
    # Several processes on one machine may each load libtpu to compile (no TPU is opened).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=tpu.topology,
            chip_config_name=tpu.chip.chip_config,
            chips_per_host_bounds=tpu.chips_per_host,
            num_slices=slices,
        )
    except Exception as e:  # noqa: BLE001 - libtpu missing or refusing: one line, what to do
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(
            f"cannot build the {tpu.name} topology with libtpu ({first}); install the compiler "
            "with `pip install 'rsa_jax[tpu-compile]'`"
        ) from None
    return tuple(desc.devices)


def libtpu_available() -> bool:
    """Whether libtpu (the TPU compiler) is installed."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None
