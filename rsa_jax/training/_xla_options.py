"""XLA compiler options of rsa_jax's train steps, per backend.

On the CPU backend, jax 0.10.2's XLA hands dots to YNNPACK (`ynn_fusion` operations in a
profile; XLA's option `xla_cpu_experimental_ynn_fusion_type`). rsa_jax compiles its train steps
with YNNPACK's dots off, so that XLA runs them itself (Eigen's multi-threaded contraction, the
path XLA used before YNNPACK). Why, measured on a 2-core AMD EPYC (bench/vs_torch.py
`--baseline` pairs, docs/performance.md): the attention's small batched products
([B K, G L, E] x [B K, E, S] for SmolLM2-135M at 4 x 128) ran 1.7-2.2x faster forward+backward
without YNNPACK, and the big weight matmuls ran as fast (150-200 GFLOP/s either way). With one
free core the two are equal: the difference is how well both cores are used.

Why per compiled program (`jax.jit(..., compiler_options=...)`) and not XLA_FLAGS: XLA_FLAGS is
read once per process, when JAX opens its first backend, so a library setting it depends on
import order and changes every other JAX program of the user's process. Compiler options touch
only the steps rsa_jax compiles, whatever was imported first.

Overrides, in order:
- `XLA_FLAGS` naming `xla_cpu_experimental_ynn_fusion_type`: the user's flag wins, rsa_jax adds
  nothing;
- the environment variable `RSA_JAX_CPU_DOTS`: `eigen` (the default) or `xla` (XLA's own
  default, YNNPACK on jax 0.10.2).
Off the CPU nothing is set.
"""

from __future__ import annotations

import os

CPU_DOTS_ENV = "RSA_JAX_CPU_DOTS"
CPU_DOTS = ("eigen", "xla")
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def step_compiler_options(platform: str) -> dict[str, str]:
    """The `compiler_options` of a train step compiled for `platform` ("cpu", "gpu", "tpu").

    {} off the CPU, with `RSA_JAX_CPU_DOTS=xla`, or when XLA_FLAGS already sets the YNNPACK
    option; else {YNN_OPTION: ""} (no operation fused into YNNPACK). Raises ValueError naming
    the variable for any other `RSA_JAX_CPU_DOTS` value."""
    choice = os.environ.get(CPU_DOTS_ENV, "eigen").strip().lower() or "eigen"
    if choice not in CPU_DOTS:
        raise ValueError(
            f"{CPU_DOTS_ENV}={os.environ[CPU_DOTS_ENV]!r}: expected one of {', '.join(CPU_DOTS)}"
        )
    if platform != "cpu" or choice == "xla" or YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {YNN_OPTION: ""}
