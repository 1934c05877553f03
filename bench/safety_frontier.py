"""The stage-2 temperature sweep of the safety comparison: SACPO vs RSA on the synthetic task.

The SACPO and RSA papers sweep beta_2 (the safety stage's beta) over 0.1, 0.05, 0.025, 0.01;
a smaller beta_2 lets the safety stage move further from the stage-1 policy. This script reuses
the SFT models and pairs that `make demo` wrote (runs/demo/seed*/), trains each method at each
beta_2 from the same SFT model on the same pairs, evaluates on the held-out prompts, and prints
one table (mean over seeds, t-interval) and a reward-cost plot with one point per (method,
beta_2), so the methods can be compared at comparable reward.

    python bench/safety_frontier.py                      # after `make demo`
    python bench/safety_frontier.py --betas 0.05 0.01 --methods SACPO RSA-CVaR --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import time

from rsa_jax.demo import DemoConfig, evaluate_dir, method_config
from rsa_jax.eval import aggregate_seeds, results_table, seeds_interval, tail_metrics, write_results
from rsa_jax.models import load_hf
from rsa_jax.tasks import SafetyTask


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-dir", default="runs/demo")
    p.add_argument("--out", default="runs/safety_frontier")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["SACPO", "RSA-CVaR", "RSA-ERM"])
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.05, 0.025, 0.01])
    p.add_argument(
        "--lrs", type=float, nargs="+", default=[1e-4], help="peak learning rates (both stages)"
    )
    p.add_argument("--epochs", type=int, nargs="+", default=[2], help="passes per stage")
    args = p.parse_args()

    from rsa_jax.training import train

    task = SafetyTask()
    demo = DemoConfig(out_dir=args.demo_dir)
    per_seed = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        root = os.path.join(args.demo_dir, f"seed{seed}")
        sft = os.path.join(root, "sft")
        paths = {
            "helpfulness": os.path.join(root, "data", "helpfulness.jsonl"),
            "safety": os.path.join(root, "data", "safety.jsonl"),
        }
        if not os.path.exists(os.path.join(sft, "model.safetensors")):
            raise SystemExit(f"{sft}: missing; run `make demo` (or rsa-jax demo) first")
        _, test_prompts = task.split_prompts(seed=seed)
        reference = load_hf(sft)
        rows = {}
        grid = itertools.product(args.methods, args.lrs, args.epochs, args.betas)
        for method, lr, epochs, beta in grid:
            name = f"{method} lr={lr:g} ep={epochs} b2={beta:g}"
            tag = f"{method}_lr_{lr:g}_ep_{epochs}_b2_{beta:g}"
            run_dir = os.path.join(args.out, f"seed{seed}", tag)
            setting = dataclasses.replace(demo, learning_rate=lr, epochs=epochs)
            config = method_config(setting, method, sft, paths, seed, run_dir)
            stages = list(config.stages)
            stages[-1] = dataclasses.replace(stages[-1], beta=beta)
            train(dataclasses.replace(config, stages=stages))
            scores, info = evaluate_dir(
                run_dir, test_prompts, reference, demo, seed=seed, task=task
            )
            rows[name] = tail_metrics(scores, n_boot=200, seed=seed)
            print(
                f"[seed {seed}] {name}: reward {rows[name]['reward_mean'].value:.3f}, "
                f"catastrophic {rows[name]['catastrophic_rate'].value:.4f}, "
                f"{100 * info['unfinished']:.1f}% unfinished "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        write_results(os.path.join(args.out, f"seed{seed}"), rows)
        per_seed.append(rows)
    rows = aggregate_seeds(per_seed) if len(per_seed) > 1 else per_seed[0]
    interval = seeds_interval(len(per_seed)) if len(per_seed) > 1 else "95% prompt bootstrap"
    write_results(args.out, rows, interval=interval)
    print(f"\nIntervals: {interval}.")
    print(results_table(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s; results and reward_cost.png in {args.out}/")


if __name__ == "__main__":
    main()
