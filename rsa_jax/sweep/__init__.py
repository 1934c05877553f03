"""Sweeps over risk functionals and hyperparameters: a sweep file (base config, grid and/or
explicit variants), run sequentially through the trainer (variants that share a kernel share one
compiled step) or all at once under `jax.vmap` (on one device, or with `variant_devices` split
over a `variant` mesh axis), then one results table and plot.
`rsa-jax sweep FILE [--mode vmap|sequential] [--dry-run]`.
"""

from rsa_jax.sweep._file import (
    MODES,
    Sweep,
    SweepError,
    Variant,
    format_value,
    load_sweep,
)
from rsa_jax.sweep._placement import VARIANT_AXIS, VariantPlacement, variant_placement
from rsa_jax.sweep._results import write_sweep_results
from rsa_jax.sweep._run import (
    SweepEvalError,
    check_sweep,
    describe,
    is_done,
    run_sequential,
    run_sweep,
)
from rsa_jax.sweep._vmap import run_vmap

__all__ = [
    "MODES",
    "VARIANT_AXIS",
    "Sweep",
    "SweepError",
    "SweepEvalError",
    "Variant",
    "VariantPlacement",
    "check_sweep",
    "describe",
    "format_value",
    "is_done",
    "load_sweep",
    "run_sequential",
    "run_sweep",
    "run_vmap",
    "variant_placement",
    "write_sweep_results",
]
