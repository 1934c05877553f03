"""Ahead-of-time compilation of a run's programs for a TPU slice, from any machine.

    from rsa_jax.compile import compile_config
    from rsa_jax.config import load_config

    reports = compile_config(load_config("configs/rsa_cvar.yaml", ["model.path=llama-2-7b"]),
                             "v5p-8")

libtpu (the optional `tpu-compile` extra) compiles for the slice's devices with no TPU present;
the programs are the engine's own train steps (and a vmap sweep's step) and the evaluation
sampler's batch (`rsa_jax.generate`'s jitted sampler, as `rsa-jax eval` calls it), given shapes and
shardings only, so no weight is read or allocated. Each report gives per-chip memory by role
against the chip's HBM, analytic FLOPs and the step-time bound at peak, the collectives by
mesh axis with bytes per step, and the compile time. `rsa-jax compile` is the command line.

- `TPU_SLICES`, `tpu_slice(name)`, `topology_devices(name, slices)`: the Cloud TPU table.
- `PRESETS`, `architecture(path)`: named architectures (shapes only).
- `step_flops`, `StepShape`: the analytic FLOP count of a step; `sampler_flops`, `SamplerShape`:
  of an evaluation sampling batch; `collectives`: the HLO's collectives.
"""

from rsa_jax.compile._presets import PRESETS, architecture, parameter_count
from rsa_jax.compile._programs import (
    Program,
    sampler_program,
    sweep_programs,
    train_programs,
)
from rsa_jax.compile._report import (
    Collectives,
    Memory,
    SamplerShape,
    StepShape,
    collectives,
    sampler_flops,
    step_flops,
)
from rsa_jax.compile._run import ProgramReport, compile_config, report, run_compile
from rsa_jax.compile._topology import (
    CHIPS,
    TPU_SLICES,
    TopologyError,
    TpuSlice,
    libtpu_available,
    topology_devices,
    tpu_slice,
)

__all__ = [
    "CHIPS",
    "PRESETS",
    "TPU_SLICES",
    "Collectives",
    "Memory",
    "Program",
    "ProgramReport",
    "SamplerShape",
    "StepShape",
    "TopologyError",
    "TpuSlice",
    "architecture",
    "collectives",
    "compile_config",
    "libtpu_available",
    "parameter_count",
    "report",
    "run_compile",
    "sampler_flops",
    "sampler_program",
    "step_flops",
    "sweep_programs",
    "topology_devices",
    "tpu_slice",
    "train_programs",
]
