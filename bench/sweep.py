"""Wall time of a K-variant hyperparameter sweep on the tiny model, three ways:

(a) sequential, recompiling: the step cache cleared before every variant (what separate
    processes, or a step rebuilt per run, would pay);
(b) sequential, one compiled step: `rsa-jax sweep` mode sequential (the trainer's step cache);
(c) vmap: `rsa-jax sweep --mode vmap`, all K variants in one program.

Each includes its compiles, training, logging and checkpoints; the tiny model's random init is
compiled once before timing. Ratios are against (a) measured in the same run.

    python bench/sweep.py --variants 8 --steps 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _sweep_file(directory: str, k: int, steps: int, data: str) -> str:
    """K variants differing in stage-2 beta and the learning rate (traced hyperparameters)."""
    variants = [
        {
            "name": f"v{i}",
            "overrides": [
                f"stages.1.beta={0.02 * (i + 1):.2f}",
                f"optim.learning_rate={0.001 * (1 + i % 3):.3f}",
            ],
        }
        for i in range(k)
    ]
    doc = {
        "base": os.path.join(ROOT, "configs", "tiny.yaml"),
        "overrides": [
            f"data.path={data}",
            "checkpoint.every=0",
            "train.progress_bar=false",
            f"stages.0.steps={steps}",
            f"stages.1.steps={steps}",
        ],
        "variants": variants,
        "run_dir": os.path.join(directory, "unused"),
    }
    path = os.path.join(directory, "sweep.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def _steady_step(variants) -> float:
    """Median logged step time over the variants' steps, the first step of each stage (the
    compile, when there is one) left out."""
    import json

    import numpy as np

    times = []
    for v in variants:
        with open(os.path.join(v.run_dir, "metrics.jsonl")) as f:
            times += [r["step_time_s"] for r in map(json.loads, f) if r["step"] > 1]
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=8, help="K")
    parser.add_argument("--steps", type=int, default=4, help="steps per stage (two stages)")
    args = parser.parse_args()

    import jax

    from rsa_jax.data import write_toy_data
    from rsa_jax.sweep import load_sweep, run_sequential, run_vmap
    from rsa_jax.training import Engine, clear_step_cache, train

    work = tempfile.mkdtemp(prefix="bench_sweep_")
    data = os.path.join(work, "pairs.jsonl")
    write_toy_data(data, rows=max(64, 4 * args.steps * 2))
    path = _sweep_file(work, args.variants, args.steps, data)

    def sweep(mode: str, name: str | None = None):
        return load_sweep(path, mode=mode, run_dir=os.path.join(work, name or mode))

    warm = sweep("sequential").variants[0].config
    Engine(warm).initial  # noqa: B018 - the init's compile is not part of any measurement

    timings = {}
    t0 = time.perf_counter()
    for v in sweep("sequential", "recompile").variants:
        clear_step_cache()
        train(v.config)
    timings["(a) sequential, recompiling"] = time.perf_counter() - t0

    clear_step_cache()
    t0 = time.perf_counter()
    run_sequential(sweep("sequential"))
    timings["(b) sequential, one compiled step"] = time.perf_counter() - t0

    clear_step_cache()
    t0 = time.perf_counter()
    run_vmap(sweep("vmap"))
    timings["(c) vmap, one program"] = time.perf_counter() - t0

    steady = {
        "(b)": _steady_step(sweep("sequential").variants),
        "(c)": _steady_step(sweep("vmap").variants),
    }
    base = timings["(a) sequential, recompiling"]
    print()
    print(
        f"K={args.variants} variants x 2 stages x {args.steps} steps, tiny model, "
        f"{jax.devices()[0].platform}, load average {os.getloadavg()[0]:.1f}"
    )
    for name, seconds in timings.items():
        print(f"{name:36s} {seconds:8.1f} s   x{base / seconds:5.2f} vs (a)")
    k = args.variants
    print(
        f"steady-state step (median, compiles excluded): (b) {1e3 * steady['(b)']:.0f} ms per "
        f"variant, {1e3 * k * steady['(b)']:.0f} ms for all K; (c) {1e3 * steady['(c)']:.0f} ms "
        "for all K at once"
    )


if __name__ == "__main__":
    main()
