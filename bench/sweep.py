"""Wall time of a K-variant hyperparameter sweep on the tiny model, three ways:

(a) sequential, recompiling: the step cache cleared before every variant (what separate
    processes, or a step rebuilt per run, would pay);
(b) sequential, one compiled step: `rsa-jax sweep` mode sequential (the trainer's step cache);
(c) vmap: `rsa-jax sweep --mode vmap`, all K variants in one program.

Each includes its compiles, training, logging and checkpoints; the tiny model's random init is
compiled once before timing. Ratios are against (a) measured in the same run.

Then, in a child process with 8 simulated CPU devices (`--placed-devices`, 0 to skip):
(c') vmap on one device of that process, and (d) vmap with the K axis on a `variant` mesh axis
(`variant_devices`, see `rsa_jax.sweep._placement`), ratio against (c'). The simulated devices
share this machine's cores, so (d) only shows that the placed program runs and what its
compiles cost; its speed is for real accelerators, where each variant group has its own chips.

    python bench/sweep.py --variants 8 --steps 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
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

    from rsa_jax.training import RunDir

    times = []
    for v in variants:
        with open(RunDir(v.run_dir).metrics_file) as f:
            times += [r["step_time_s"] for r in map(json.loads, f) if r["step"] > 1]
    return float(np.median(times))


def _placed(args) -> None:
    """The child: (c') vmap on one device and (d) vmap over the variant axis, in one process
    with `args.placed_devices` simulated devices; prints one JSON line of seconds."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.placed_devices}"
    )
    import jax

    from rsa_jax.data import write_toy_data
    from rsa_jax.sweep import load_sweep, run_vmap, variant_placement
    from rsa_jax.training import Engine
    from rsa_jax.training._engine import clear_step_cache

    assert len(jax.devices()) == args.placed_devices, jax.devices()
    work = tempfile.mkdtemp(prefix="bench_sweep_placed_")
    data = os.path.join(work, "pairs.jsonl")
    write_toy_data(data, rows=max(64, 4 * args.steps * 2))
    path = _sweep_file(work, args.variants, args.steps, data)
    config = load_sweep(path).variants[0].config
    for devices in (None, args.variant_devices):  # each layout's init compiled before timing
        layout = variant_placement(config, args.variants, devices, where=path).layout
        Engine(config, layout=layout, check_devices=False).initial  # noqa: B018

    out = {}
    for name, devices in (("one", None), ("placed", args.variant_devices)):
        sweep = load_sweep(path, mode="vmap", run_dir=os.path.join(work, name))
        sweep = dataclasses.replace(sweep, variant_devices=devices)
        clear_step_cache()
        t0 = time.perf_counter()
        run_vmap(sweep)
        out[name] = time.perf_counter() - t0
        out[f"{name}_step"] = _steady_step(sweep.variants)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=8, help="K")
    parser.add_argument("--steps", type=int, default=4, help="steps per stage (two stages)")
    parser.add_argument(
        "--placed-devices", type=int, default=8, help="simulated devices of (d); 0: skip (d)"
    )
    parser.add_argument(
        "--variant-devices", type=int, default=8, help="(d): devices along the variant axis"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _placed(args)
        return

    import jax

    from rsa_jax.data import write_toy_data
    from rsa_jax.sweep import load_sweep, run_sequential, run_vmap, variant_placement
    from rsa_jax.training import Engine, train
    from rsa_jax.training._engine import clear_step_cache

    work = tempfile.mkdtemp(prefix="bench_sweep_")
    data = os.path.join(work, "pairs.jsonl")
    write_toy_data(data, rows=max(64, 4 * args.steps * 2))
    path = _sweep_file(work, args.variants, args.steps, data)

    def sweep(mode: str, name: str | None = None):
        return load_sweep(path, mode=mode, run_dir=os.path.join(work, name or mode))

    warm = sweep("sequential").variants[0].config
    Engine(warm).initial  # noqa: B018 - the init's compile is not part of any measurement
    vmap_layout = variant_placement(warm, args.variants, None, where=path).layout
    Engine(warm, layout=vmap_layout, check_devices=False).initial  # noqa: B018 - (c)'s layout

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
    if args.placed_devices:
        child = subprocess.run(
            [sys.executable, __file__, "--child", *sys.argv[1:]],
            capture_output=True,
            text=True,
            env=dict(
                os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
            ),
        )
        if child.returncode:
            sys.exit(f"the placed-sweep child failed:\n{child.stderr[-3000:]}")
        t = json.loads(child.stdout.strip().splitlines()[-1])
        n, v = args.placed_devices, args.variant_devices
        print(
            f"{n} simulated CPU devices (one process): (c') vmap on one device {t['one']:.1f} s, "
            f"(d) K on a variant axis of {v} devices x {n // v} per group {t['placed']:.1f} s "
            f"(x{t['one'] / t['placed']:.2f} vs c'); steady step {1e3 * t['one_step']:.0f} ms vs "
            f"{1e3 * t['placed_step']:.0f} ms. Simulated devices share the same cores: this "
            "shows (d) runs, not its speed on accelerators."
        )


if __name__ == "__main__":
    main()
