"""Our DPO train step compiled several ways in one process, timed alternately: XLA's CPU dots
(YNNPACK, jax 0.10.2's default, against XLA's own Eigen dots) and `model.remat` on/off.

The step is `bench/vs_torch.py`'s (SmolLM2-135M, float32, `B` pairs x `L` tokens, AdamW with
clipping, logits head, through `Engine.compiled_step`). Every variant is compiled from the same
process, so one train state threads through all of them, and repetition r runs one step of each
in turn (reversed on odd r): a load change on a shared machine hits every variant alike. Per
step it prints the wall time and the cores used (process CPU time over wall time: 2.0 on two
idle cores, about 1.0 when another process holds one of them).

    python bench/step_variants.py                    # 4 x 128: dots ynn/eigen, remat off/on
    python bench/step_variants.py --pairs 1 --length 32 --repeats 2    # quick look

The dots variant passes `compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""}` to
XLA (no operation fused into YNNPACK; every dot runs on XLA's Eigen path). The last line is one
JSON object: medians, compiled temporary memory, and each variant's time over the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import jax
from vs_torch import ARTIFACT, BETA, LR, MAX_GRAD_NORM, make_batch

from rsa_jax.config import Config, DataConfig, ModelConfig, OptimConfig, StageConfig
from rsa_jax.training import Engine, PairObjective, device_copy, state_shardings
from rsa_jax.training._mesh import place_batch

# name: (model.remat, XLA compiler options)
VARIANTS = {
    "ynn_dots": (False, {}),
    "eigen_dots": (False, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "remat": (True, {}),
}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=ARTIFACT)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of {list(VARIANTS)}; ratios are over the first",
    )
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    optim = OptimConfig(
        learning_rate=LR, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM
    )
    stage = StageConfig(loss="dpo", risk="cvar_reference", beta=BETA, mu=0.95, split_vocab=True)
    load0 = os.getloadavg()
    compiled, temp_mib = {}, {}
    state = reference = batch = hyper = None
    for name in names:
        remat, options = VARIANTS[name]
        model = ModelConfig(path=args.model, compute_dtype="float32", remat=remat)
        engine = Engine(Config(model=model, data=DataConfig(batch_size=args.pairs), optim=optim))
        if state is None:  # one state, reference and batch for every variant
            reference = device_copy(engine.initial)
            state = engine.new_state(engine.initial)
            vocab = engine.model.llama.vocab_size
            batch = place_batch(make_batch(args.pairs, args.length, vocab), engine.layout.batch)
            hyper = engine.hyper(stage, 1000)
        step = engine.compiled_step(
            PairObjective(stage.kernel, head="logits"), state_shardings(state)
        )
        lowered = step.lower(state, reference, batch, hyper)
        compiled[name] = lowered.compile(compiler_options=options)
        temp_mib[name] = round(compiled[name].memory_analysis().temp_size_in_bytes / 2**20)
        print(f"{name}: compiled, temporaries {temp_mib[name]} MiB", flush=True)
    for name in names:  # warm-up
        state, metrics = compiled[name](state, reference, batch, hyper)
        jax.block_until_ready(metrics)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start, cpu = time.perf_counter(), _cpu_seconds()
            state, metrics = compiled[name](state, reference, batch, hyper)
            jax.block_until_ready(metrics)
            wall = time.perf_counter() - start
            times[name].append(wall)
            cores = (_cpu_seconds() - cpu) / wall
            print(f"rep {r}: {name:11s} {wall:7.3f} s  cores {cores:.2f}", flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "pairs": args.pairs,
        "length": args.length,
        "step_s": {n: round(t, 4) for n, t in med.items()},
        "temp_mib": temp_mib,
        "over_first": {n: round(t / med[names[0]], 3) for n, t in med.items()},
        "load_average": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
