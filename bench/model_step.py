"""Model benchmark: SmolLM2-135M forward+backward on the CPU, scanned vs unrolled, remat on/off.

One jitted value-and-grad of the mean next-token cross-entropy (full [B, L, V] float32 logits)
with respect to every parameter, at batch 4 x 128 and 8 x 256 tokens by default. Reports the
compile time, the step time (best of `--repeats` after one warm-up), tokens/s, and the peak
memory XLA assigns to the compiled step (temporaries + arguments + outputs,
`Compiled.memory_analysis()`). The weights are the converted bundled SmolLM2 (converted once
into artifacts/smollm2-135m if missing). For comparison: PyTorch CPU forward+backward of the same
model at 4 x 128 takes about 3 s on the project's 2-core machines.

    python bench/model_step.py                    # full run (several minutes on 2 cores)
    python bench/model_step.py --shapes 4x128 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsa_jax.models import load_hf
from rsa_jax.models._gguf import bundled_smollm2_gguf, convert_gguf

ARTIFACT = os.path.join(os.path.dirname(__file__), "..", "artifacts", "smollm2-135m")
VARIANTS = (  # (name, scan_layers, remat)
    ("unrolled", False, False),
    ("unrolled+remat", False, True),
    ("scan", True, False),
    ("scan+remat", True, True),
)


def _step_fn(graphdef, rest):
    def loss(params, ids, mask):
        model = nnx.merge(graphdef, params, rest)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits = model.logits(model(ids, positions, mask))[:, :-1]  # [B, L-1, V] float32
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    return jax.jit(jax.value_and_grad(loss))


def run(path: str, shapes, repeats: int) -> None:
    print(f"devices: {jax.devices()}  (cpu count {os.cpu_count()})")
    # The machines are shared: a load average above the core count means slower, noisier steps.
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    columns = ("shape", "variant", "compile s", "step s", "tokens/s", "peak MiB")
    header = " ".join(f"{c:>{w}}" for c, w in zip(columns, (7, 15, 9, 7, 9, 9), strict=True))
    print(header)
    print("-" * len(header))
    for b, length in shapes:
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(3, 49152, size=(b, length)), jnp.int32)
        mask = jnp.ones((b, length), bool)
        for name, scan, remat in VARIANTS:
            model = load_hf(path, scan_layers=scan, remat=remat)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            step = _step_fn(graphdef, rest)
            start = time.perf_counter()
            compiled = step.lower(params, ids, mask).compile()
            compile_s = time.perf_counter() - start
            mem = compiled.memory_analysis()
            peak = (
                mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            ) / 2**20
            jax.block_until_ready(compiled(params, ids, mask))  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, ids, mask))
                times.append(time.perf_counter() - start)
            best = min(times)
            print(
                f"{b:>3}x{length:<3} {name:>15} {compile_s:9.1f} {best:7.2f} "
                f"{b * length / best:9.0f} {peak:9.0f}   load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            del model, params, compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4x128,8x256", help="comma-separated BxL list")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=None, help="HF directory (default: bundled SmolLM2)")
    args = parser.parse_args()
    path = args.model or convert_gguf(bundled_smollm2_gguf(), ARTIFACT)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    run(path, shapes, args.repeats)


if __name__ == "__main__":
    main()
