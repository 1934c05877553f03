"""`rsa-jax` (and `python -m rsa_jax`): train, sweep, eval, demo, merge, export, toy-data,
check-config.

rsa-jax train configs/rsa_cvar.yaml model.path=/models/sft train.run_dir=runs/rsa stages.1.beta=0.05
rsa-jax merge runs/sacpo/stage1_export runs/sacpo --q 0.5 --out merged/
rsa-jax export runs/rsa out/rsa_hf
rsa-jax eval runs/demo/seed0/SACPO runs/demo/seed0/RSA-CVaR --task safety \
    --reference runs/demo/seed0/sft --samples 32 --max-new-tokens 20 --out runs/eval
rsa-jax demo --seeds 0 1 2
rsa-jax sweep configs/sweeps/tiny_risks.yaml --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import numpy as np

log = logging.getLogger("rsa_jax")

_TOY_WORDS = ["bread", "safe", "help", "no", "story", "Paris", "kind", "sorry", "yes", "bake"]


def write_toy_data(path: str, rows: int = 64, seed: int = 0) -> None:
    """Synthetic rows in the PKU-SafeRLHF schema (the real set is not redistributable here)."""
    rng = np.random.default_rng(seed)

    def text(k):
        return " ".join(rng.choice(_TOY_WORDS, size=k))

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i in range(rows):
            row = {
                "prompt": f"q{i} " + text(int(rng.integers(2, 8))),
                "response_0": "safe help " + text(int(rng.integers(2, 10))),
                "response_1": "no " + text(int(rng.integers(2, 10))) + " sorry",
                "better_response_id": int(rng.integers(0, 2)),
                "safer_response_id": 0,
                "is_response_0_safe": True,
                "is_response_1_safe": False,
            }
            f.write(json.dumps(row) + "\n")


def _cmd_train(args) -> int:
    from rsa_jax.config import load_config
    from rsa_jax.training._trainer import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    print(f"{result.status} at global step {result.global_step}; run dir {config.train.run_dir}")
    return 0


def _export(spec, params, tokenizer, out: str) -> None:
    from rsa_jax.models import save_hf

    save_hf(spec.module(params), out, tokenizer=tokenizer)
    print(f"wrote {out}")


def _cmd_export(args) -> int:
    from rsa_jax.training._trainer import latest_policy

    spec, params, tokenizer = latest_policy(args.run_dir)
    _export(spec, params, tokenizer, args.out)
    return 0


def merge_params(a: dict, b: dict, q: float) -> dict:
    """theta = (1 - q) a + q b, leaf by leaf (RSA(P) / P-SACPO model merging)."""
    if set(a) != set(b):
        raise ValueError(f"the checkpoints hold different parameters: {sorted(set(a) ^ set(b))}")
    out = {}
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"parameter {k}: shapes {a[k].shape} and {b[k].shape} differ")
        out[k] = (1 - q) * a[k] + q * b[k]
    return out


def _cmd_merge(args) -> int:
    from rsa_jax.training._trainer import latest_policy

    if not 0 <= args.q <= 1:
        raise SystemExit(f"--q must lie in [0, 1], got {args.q}")
    spec, a, tokenizer = latest_policy(args.first)
    spec_b, b, _ = latest_policy(args.second)
    if spec.llama != spec_b.llama:
        raise SystemExit("merge: the two runs use different model configurations")
    _export(spec, merge_params(a, b, args.q), tokenizer, args.out)
    return 0


def _cmd_toy_data(args) -> int:
    write_toy_data(args.path, rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} rows to {args.path}")
    return 0


def _cmd_check(args) -> int:
    from rsa_jax.config import load_config, to_json

    print(to_json(load_config(args.config, args.overrides)))
    return 0


def _read_prompts(path: str) -> list[str]:
    """Prompts from a JSON Lines file (field `prompt`) or a text file (one prompt per line)."""
    prompts = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{line_no}: not JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise SystemExit(f"{path}:{line_no}: field 'prompt' missing or not a string")
                prompts.append(row["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def _cmd_eval(args) -> int:
    from rsa_jax.eval import (
        evaluate_model,
        load_model,
        load_scorer,
        mesh_from_text,
        results_table,
        sample_rows,
        tail_metrics,
        write_results,
        write_samples,
    )

    if args.task == "safety":
        from rsa_jax.tasks import TEMPLATE, OracleScorer, SafetyTask

        task = SafetyTask()
        scorer = OracleScorer(task)
        prompts = _read_prompts(args.prompts) if args.prompts else task.split_prompts(seed=0)[1]
        template = args.template or TEMPLATE
    else:
        if not (args.scorer and args.prompts):
            raise SystemExit("eval: without --task, give --scorer module:attr and --prompts FILE")
        scorer = load_scorer(args.scorer)
        prompts = _read_prompts(args.prompts)
        template = args.template
    try:
        mesh = mesh_from_text(args.mesh) if args.mesh else None  # None: each model's own mesh
    except ValueError as e:
        raise SystemExit(f"eval --mesh: {e}") from None
    if args.memory_gb is not None and not args.memory_gb > 0:
        raise SystemExit(f"eval --memory-gb: must be > 0, got {args.memory_gb}")
    budget = int(args.memory_gb * 2**30) if args.memory_gb else None
    reference = load_model(args.reference, mesh)[0] if args.reference else None
    rows, per_sample, texts = {}, {}, []
    for path in args.models:
        name = os.path.basename(os.path.normpath(path))
        model, tokenizer = load_model(path, mesh)
        scores, samples = evaluate_model(
            model,
            tokenizer,
            prompts,
            scorer,
            reference=reference,
            n=args.samples,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            template=template,
            memory_budget=budget,
        )
        rows[name] = tail_metrics(scores, n_boot=args.n_boot, seed=args.seed)
        per_sample[name] = scores
        texts += sample_rows(name, prompts, samples, scores)
        unfinished = float(np.mean(~samples.finished))
        print(f"{name}: {len(scores)} samples, {100 * unfinished:.1f}% hit the token budget")
    written = write_results(args.out, rows, per_sample)  # tables and both plots
    written["samples"] = write_samples(args.out, texts)  # every sample's text and scores
    print(results_table(rows))
    print(f"wrote {', '.join(sorted(os.path.basename(p) for p in written.values()))} to {args.out}")
    return 0


def _cmd_sweep(args) -> int:
    from rsa_jax.sweep import describe, load_sweep, run_sweep

    sweep = load_sweep(args.sweep, mode=args.mode, run_dir=args.run_dir, overrides=args.overrides)
    if args.dry_run:
        print(describe(sweep))
        return 0
    results = run_sweep(sweep)
    return 0 if "variants" in results else 1


def _cmd_demo(args) -> int:
    from rsa_jax.tasks.pipeline import DemoConfig, run_demo

    if not os.path.isdir(args.configs):
        raise SystemExit(f"demo: {args.configs}/ not found (the method configs; see --configs)")
    demo = DemoConfig(out_dir=args.out, seeds=tuple(args.seeds), configs_dir=args.configs)
    if args.quick:
        demo = dataclasses.replace(
            demo, sft_steps=150, pair_prompts=512, epochs=1, eval_samples=8, n_boot=200
        )
    run_demo(demo)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsa-jax", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (resumes from the run directory automatically)")
    p.add_argument("config", help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.learning_rate=1e-5")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("check-config", help="load, validate and print the resolved config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=_cmd_check)

    p = sub.add_parser("merge", help="weight-average the latest policies of two runs")
    p.add_argument("first", help="run directory of theta_a (e.g. a stage-1 run)")
    p.add_argument("second", help="run directory of theta_b")
    p.add_argument("--q", type=float, default=0.5, help="theta = (1-q) a + q b")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.set_defaults(fn=_cmd_merge)

    p = sub.add_parser("export", help="write the latest policy as an HF safetensors directory")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser(
        "eval", help="sample N responses per prompt, score them, report tail-risk metrics"
    )
    p.add_argument("models", nargs="+", help="HF model directories or run directories")
    p.add_argument("--task", choices=["safety"], help="the synthetic safety task's oracles")
    p.add_argument("--scorer", help="a user scorer, module:attr (see rsa_jax.eval.Scorer)")
    p.add_argument("--prompts", help="JSON Lines (field 'prompt') or text, one per line")
    p.add_argument("--reference", help="model for the KL estimate (e.g. the SFT model)")
    p.add_argument("--template", help="prompt template with {prompt}; default: chat template")
    p.add_argument("--samples", type=int, default=16, help="samples per prompt (N)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", required=True, help="directory for results.{md,json}, samples.jsonl and plots"
    )
    p.add_argument(
        "--mesh",
        help="DATA,FSDP,TENSOR devices per mesh axis, -1 for the rest (default: a run "
        "directory's training mesh; a model directory: all devices on data)",
    )
    p.add_argument(
        "--memory-gb", type=float, help="memory per device for one batch (default: half the free)"
    )
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("sweep", help="train the variants of a sweep file, then one results table")
    p.add_argument("sweep", help="sweep YAML (configs/sweeps/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every variant")
    p.add_argument("--mode", choices=["sequential", "vmap"], help="overrides the file's mode")
    p.add_argument("--run-dir", help="overrides the file's run_dir")
    p.add_argument("--dry-run", action="store_true", help="print the variants, train nothing")
    p.set_defaults(fn=_cmd_sweep)

    p = sub.add_parser("demo", help="the synthetic safety task end to end (what make demo runs)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--configs", default="configs", help="directory of the method configs")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("toy-data", help="write synthetic PKU-SafeRLHF-schema rows (smoke tests)")
    p.add_argument("path")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_toy_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes
    from rsa_jax.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"rsa-jax: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
