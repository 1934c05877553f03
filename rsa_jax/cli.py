"""`rsa-jax` (and `python -m rsa_jax`): train, compile, sweep, eval, generate, frontier, demo,
merge, export, toy-data, check-config.

rsa-jax train configs/rsa_cvar.yaml model.path=/models/sft train.run_dir=runs/rsa stages.1.beta=0.05
rsa-jax compile configs/rsa_cvar.yaml --topology v5p-8 model.path=llama-2-7b mesh.fsdp=4 mesh.data=1
rsa-jax merge runs/sacpo/stage1_export runs/sacpo --q 0.5 --out merged/
rsa-jax export runs/rsa out/rsa_hf
rsa-jax eval runs/demo/seed0/SACPO runs/demo/seed0/RSA-CVaR --task safety \
    --reference runs/demo/seed0/sft --samples 32 --max-new-tokens 20 --out runs/eval
rsa-jax demo --seeds 0 1 2
rsa-jax sweep configs/sweeps/tiny_risks.yaml --dry-run
rsa-jax frontier runs/demo --constraint catastrophic_rate<=0.01 --out runs/frontier
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback

import numpy as np

log = logging.getLogger("rsa_jax")


def _cmd_train(args) -> int:
    import signal

    # Signals during the imports below (seconds) are kept for the trainer's StopSignal.
    pending: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: pending.append(signal.Signals(signum).name))
    from rsa_jax.config import load_config
    from rsa_jax.training import StopSignal, exit_code, finished_step, train

    config = load_config(args.config, args.overrides)
    step = finished_step(config)
    if step is not None:  # nothing to load or compile to say so
        print(f"done at global step {step} (finished earlier); run dir {config.train.run_dir}")
        return exit_code("done")
    result = train(config, stop=StopSignal(pending))
    print(f"{result.status} at global step {result.global_step}; run dir {config.train.run_dir}")
    return exit_code(result.status)


def _cmd_compile(args) -> int:
    from rsa_jax.compile import run_compile
    from rsa_jax.config import load_config

    config = load_config(args.config, args.overrides)
    given = {"eval_rows": args.eval_rows, "max_new_tokens": args.eval_max_new_tokens}
    return run_compile(
        config,
        args.topology,
        slices=args.slices,
        sweep=args.sweep,
        variant_devices=args.variant_devices,
        sampler=not args.no_sampler,
        collectives_detail=args.collectives_detail,
        **{k: v for k, v in given.items() if v is not None},  # None: run_compile's defaults
    )


def _export(policy, out: str, **save_options) -> None:
    from rsa_jax.models import save_hf

    save_hf(policy.build(policy.params), out, tokenizer=policy.tokenizer, **save_options)
    print(f"wrote {out}")


def _save_options(args) -> dict:
    return {"dtype": args.dtype, "max_shard_size": args.max_shard_size}


def _cmd_export(args) -> int:
    from rsa_jax.training import load_source

    if args.peft:
        return _export_peft(args)
    if args.base is not None:
        return _export_on_base(args)
    # A LoRA run's policy is merged (base dequantized + adapters) by load_source.
    source = args.run_dir if args.stage is None else f"{args.run_dir}@{args.stage}"
    _export(load_source(source), args.out, **_save_options(args))
    from rsa_jax.training import run_config

    try:  # the note only: the export itself is written
        lora = run_config(args.run_dir).model.lora
    except FileNotFoundError:
        lora = None
    if lora is not None and lora.rank > 0 and lora.base_storage in ("int8", "nf4"):
        print(
            f"{args.out} is the trained model: the {lora.base_storage}-dequantized base plus the "
            "adapters (--base DIR merges the adapters into a float base instead: another model)"
        )
    return 0


def _export_on_base(args) -> int:
    """`--base DIR`: a LoRA run's adapters merged into the float base DIR (PEFT's
    merge_and_unload), which for a quantized training base is not the trained model."""
    from rsa_jax.models import merge_into_base
    from rsa_jax.training import load_adapters

    engine, adapters = load_adapters(args.run_dir, stage=args.stage)
    spec = engine.model.lora
    if spec is None:
        raise CommandLineError(f"--base: {args.run_dir} is a full fine-tuning run (no adapters)")
    merge_into_base(
        spec,
        adapters,
        args.base,
        args.out,
        scan_layers=engine.config.model.scan_layers,
        tokenizer=engine.tokenizer,
        dtype=args.dtype,
    )
    trained = engine.config.model.path
    same = os.path.abspath(args.base) == os.path.abspath(trained)
    storage = spec.lora.base_storage
    print(
        f"wrote {args.out}: the adapters merged into the float base {args.base}"
        + ("" if same else f" (they were trained on {trained})")
        + (
            f"; the trained model is the {storage}-quantized base plus the adapters "
            "(export without --base)"
            if storage in ("int8", "nf4")
            else ""
        )
    )
    return 0


def _export_peft(args) -> int:
    """A LoRA run's adapters alone, in PEFT's layout (adapter_config.json and
    adapter_model.safetensors) for `peft.PeftModel.from_pretrained(base, OUT)`."""
    from rsa_jax.models import save_peft
    from rsa_jax.training import load_adapters

    engine, adapters = load_adapters(args.run_dir, stage=args.stage)
    if engine.model.lora is None:
        print(
            f"error: --peft: {args.run_dir} is a full fine-tuning run (model.lora.rank is 0); "
            "export it without --peft",
            file=sys.stderr,
        )
        return 2
    path = engine.config.model.path
    save_peft(
        engine.model.lora,
        adapters,
        args.out,
        base_model_name_or_path=None if path == "tiny" else path,
    )
    print(f"wrote {args.out}")
    return 0


def _cmd_merge(args) -> int:
    from rsa_jax.training import merge_sources

    _export(merge_sources(args.first, args.second, args.q), args.out, **_save_options(args))
    return 0


def _cmd_toy_data(args) -> int:
    from rsa_jax.data import write_toy_data

    write_toy_data(args.path, rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} rows to {args.path}")
    return 0


def _cmd_check(args) -> int:
    from rsa_jax.config import load_config, to_json

    print(to_json(load_config(args.config, args.overrides)))
    return 0


def _prompt_set_names(text: str | None) -> list[str] | None:
    """The shipped prompt sets `--prompts` names ("harmbench,benign"), or None for a file."""
    from rsa_jax.eval.prompt_sets import PROMPT_SETS

    if not text:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names and all(name in PROMPT_SETS for name in names) and not os.path.exists(text):
        return names
    return None


def _cmd_eval(args) -> int:
    from rsa_jax.eval import (
        RecordingScorer,
        annotate,
        category_metrics,
        evaluate_model,
        load_model,
        load_scorer,
        mesh_from_text,
        quantized_base_of,
        read_prompts,
        results_table,
        sample_rows,
        tail_metrics,
        write_results,
        write_samples,
    )

    items = None  # the PromptItems of shipped prompt sets
    if args.task == "safety":
        from rsa_jax.tasks import TEMPLATE, OracleScorer, SafetyTask

        task = SafetyTask()
        scorer = OracleScorer(task)
        prompts = read_prompts(args.prompts) if args.prompts else task.split_prompts(seed=0)[1]
        template = TEMPLATE
    else:
        if not ((args.scorer or args.judge) and args.prompts):
            raise SystemExit(
                "eval: without --task, give --judge (or --scorer module:attr) and --prompts"
            )
        if args.scorer and args.judge:
            raise SystemExit("eval: give --judge or --scorer, not both")
        set_names = _prompt_set_names(args.prompts)
        if set_names is not None:
            from rsa_jax.eval.prompt_sets import load_prompt_sets

            items = load_prompt_sets(",".join(set_names), args.split)
            if args.prompt_limit is not None:
                items = [
                    item
                    for name in set_names
                    for item in [i for i in items if i.source == name][: args.prompt_limit]
                ]
            prompts = [item.text for item in items]
        else:
            prompts = read_prompts(args.prompts)
        if args.judge:
            from rsa_jax.eval.judges import make_judge

            try:
                scorer = make_judge(
                    args.judge,
                    items,
                    catastrophe_threshold=args.catastrophe_threshold,
                    compute_dtype=args.judge_dtype,
                )
            except ValueError as e:
                raise SystemExit(f"eval: {e}") from None
        else:
            scorer = load_scorer(args.scorer)
        template = None  # each model's own: _model_template
    try:
        mesh = mesh_from_text(args.mesh) if args.mesh else None  # None: each model's own mesh
    except ValueError as e:
        raise SystemExit(f"eval --mesh: {e}") from None
    if args.memory_gb is not None and not args.memory_gb > 0:
        raise SystemExit(f"eval --memory-gb: must be > 0, got {args.memory_gb}")
    budget = int(args.memory_gb * 2**30) if args.memory_gb else None
    reference = None
    if args.reference:
        reference = load_model(args.reference, mesh, compute_dtype=args.dtype)[0]
    recording = RecordingScorer(scorer)
    rows, per_sample, texts = {}, {}, []
    for path in args.models:
        name = os.path.basename(os.path.normpath(path))
        # A run is evaluated with the template it trained with (data.template; None: the chat
        # template); --template overrides it.
        model_template = _model_template(path, args.template, template)
        print(
            f"{name}: {len(prompts)} prompts x {args.samples} samples, template "
            f"{model_template if model_template is not None else 'the chat template'}",
            flush=True,
        )
        model, tokenizer = load_model(path, mesh, compute_dtype=args.dtype)
        model_reference = reference
        storage = quantized_base_of(path, args.reference) if args.reference else None
        if storage is not None:  # the float base: KL would mostly measure the quantization
            print(
                f"{name}: KL reference is the run's {storage} base with its adapters off (the "
                f"model it started from), not the float {args.reference}",
                flush=True,
            )
            model_reference = load_model(path, mesh, compute_dtype=args.dtype, adapters_off=True)[0]
        scores, samples = evaluate_model(
            model,
            tokenizer,
            prompts,
            recording,
            reference=model_reference,
            n=args.samples,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            template=model_template,
            memory_budget=budget,
            progress=True if args.progress else None,
        )
        rows[name] = tail_metrics(scores, n_boot=args.n_boot, seed=args.seed)
        per_sample[name] = scores
        model_rows = sample_rows(name, prompts, samples, scores)
        if items is not None:
            model_rows = annotate(model_rows, items, recording.extras)
            by_category, category_samples = category_metrics(
                scores, items, n_boot=args.n_boot, seed=args.seed
            )
            category_dir = os.path.join(args.out, "categories", name)
            write_results(category_dir, by_category, category_samples, plots=False)
            print(f"{name} by prompt set and category:")
            print(results_table(by_category))
        texts += model_rows
        unfinished = float(np.mean(~samples.finished))
        print(f"{name}: {len(scores)} samples, {100 * unfinished:.1f}% hit the token budget")
    written = write_results(args.out, rows, per_sample)  # tables and both plots
    written["samples"] = write_samples(args.out, texts)  # every sample's text and scores
    print(results_table(rows))
    print(f"wrote {', '.join(sorted(os.path.basename(p) for p in written.values()))} to {args.out}")
    return 0


def _generation_end_ids(path: str, tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS plus a Hugging Face directory's generation_config.json end ids (a
    run: its model.path's), which some chat models use to end a turn."""
    import json

    from rsa_jax.generate import end_ids
    from rsa_jax.training import resolve_source, run_config

    source = resolve_source(path)
    path = run_config(source.path).model.path if source.kind == "run" else source.path
    extra: list[int] = []
    generation = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation):
        with open(generation) as f:
            eos = json.load(f).get("eos_token_id")
        extra = [eos] if isinstance(eos, int) else list(eos or [])
    return end_ids(tokenizer, extra)


def _cmd_generate(args) -> int:
    import json

    from rsa_jax.eval import load_model, read_prompts
    from rsa_jax.generate import generate_text

    prompts = list(args.prompt) if args.prompt else read_prompts(args.prompts)
    model, tokenizer = load_model(args.model, stage=args.stage, compute_dtype=args.dtype)
    out = sys.stdout if args.out in (None, "-") else open(args.out, "w", encoding="utf-8")
    fmt = args.format or ("jsonl" if args.out not in (None, "-") else "text")
    several = len(prompts) * args.samples > 1

    def write(c) -> None:
        if fmt == "jsonl":
            record = {
                "prompt_index": c.prompt_index,
                "sample": c.sample_index,
                "prompt": c.prompt,
                "text": c.text,
                "tokens": len(c.tokens),
                "finished": c.finished,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            if several:
                out.write(f"--- prompt {c.prompt_index}, sample {c.sample_index}\n")
            out.write(c.text + ("\n" if c.finished else " [max tokens]\n"))
        out.flush()

    options = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "batch_size")
    given = {k: getattr(args, k) for k in options if getattr(args, k) is not None}
    try:
        generate_text(
            model,
            tokenizer,
            prompts,
            template=_model_template(args.model, args.template, None),
            n=args.samples,
            eos_ids=_generation_end_ids(args.model, tokenizer),
            on_completion=write,
            **given,
        )
    finally:
        if out is not sys.stdout:
            out.close()
    if out is not sys.stdout:
        print(f"wrote {len(prompts) * args.samples} completions to {args.out}", file=sys.stderr)
    return 0


def _model_template(path: str, explicit: str | None, default: str | None) -> str | None:
    """How prompts are formatted for the model at `path` (eval and generate): `--template`;
    else a run's own training template (`data.template`; null there: its chat template); else
    `default` (the task's template; None: the model's chat template)."""
    from rsa_jax.eval import source_template

    return source_template(path, explicit, default)


def _cmd_sweep(args) -> int:
    import signal

    # Signals during the imports below (seconds) are kept for the sweep's StopSignal.
    pending: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: pending.append(signal.Signals(signum).name))
    from rsa_jax.sweep import check_sweep, describe, load_sweep, run_sweep
    from rsa_jax.training import EXIT_PREEMPTED, StopSignal

    sweep = load_sweep(args.sweep, mode=args.mode, run_dir=args.run_dir, overrides=args.overrides)
    if args.dry_run:
        check_sweep(sweep)
        print(describe(sweep))
        return 0
    results = run_sweep(sweep, stop=StopSignal(pending))
    if "variants" in results:
        return 0
    return EXIT_PREEMPTED  # a signal stopped it (state saved); the rerun resumes


def _cmd_frontier(args) -> int:
    from rsa_jax.eval import run_frontier

    return run_frontier(
        args.dirs, args.constraint, out=args.out, methods=args.methods, method_keys=args.method_key
    )


def _cmd_demo_real(args) -> int:
    from rsa_jax.demo_real import RealDemoConfig, quick, run_real_demo

    demo = RealDemoConfig(
        out_dir=args.out, model=args.model, configs_dir=args.configs, seed=args.seed
    )
    run_real_demo(quick(demo) if args.quick else demo)
    return 0


def _cmd_demo(args) -> int:
    from rsa_jax.demo import DemoConfig, run_demo

    if not os.path.isdir(args.configs):
        raise SystemExit(f"demo: {args.configs}/ not found (the method configs; see --configs)")
    demo = DemoConfig(
        out_dir=args.out,
        seeds=tuple(args.seeds),
        configs_dir=args.configs,
        task_file=args.task,
        constraints=tuple(args.constraint),
        report_to=tuple(args.report_to),
    )
    if args.candidates_every is not None:
        demo = dataclasses.replace(demo, candidates_every=args.candidates_every)
    if args.quick:  # a smoke run: every part once, two betas, one merge per two-stage method
        demo = dataclasses.replace(
            demo,
            sft_steps=150,
            pair_prompts=512,
            epochs=1,
            betas=(0.1, 0.01),
            merge_betas=(0.1,),
            merge_qs=(0.5,),
            eval_samples=8,
            n_boot=200,
            candidates_every=demo.candidates_every if args.candidates_every is not None else 5,
        )
    run_demo(demo)
    return 0


# ---- the command line: parser, examples, errors and exit codes ----

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_DESCRIPTION = (
    "Risk-aware Stepwise Alignment (RSA) and its baselines (DPO, TDPO, Ra-DPO, SACPO) in\n"
    "JAX/Flax. Commands: {commands}."
)
_EPILOG = """\
examples:
  rsa-jax toy-data runs/tiny_data.jsonl && rsa-jax train configs/tiny.yaml
  rsa-jax <command> --help        the command's options and an example

exit codes:
  0    done
  1    an error (one line on stderr naming what is wrong; add -v for the traceback)
  2    bad command line or config (nothing was run)
  75   train, sweep: stopped by SIGTERM/SIGINT, state saved (rerun the same command to resume)
  130  interrupted (Ctrl-C) outside training
"""
# One example per subcommand, shown under its --help.
_EXAMPLES = {
    "train": "rsa-jax train configs/rsa_cvar.yaml model.path=artifacts/smollm2-135m \\\n"
    "    data.path=train.jsonl stages.1.beta=0.05 train.run_dir=runs/rsa",
    "check-config": "rsa-jax check-config configs/tiny.yaml optim.learning_rate=1e-4",
    "merge": "rsa-jax merge runs/rsa@0 runs/rsa --q 0.5 --out merged/ --dtype bfloat16",
    "export": "rsa-jax export runs/rsa out/rsa_stage0 --stage 0 --dtype bfloat16",
    "eval": "rsa-jax eval runs/demo/seed0/SACPO runs/demo/seed0/RSA-CVaR --task safety \\\n"
    "    --reference runs/demo/seed0/sft --samples 32 --max-new-tokens 20 --out runs/eval",
    "generate": "rsa-jax generate artifacts/smollm2-135m --prompt 'What is a haiku?' \\\n"
    "    --max-new-tokens 64 --temperature 0",
    "sweep": "rsa-jax sweep configs/sweeps/tiny_risks.yaml --dry-run",
    "frontier": "rsa-jax frontier runs/demo --constraint catastrophic_rate<=0.01 \\\n"
    "    --out runs/frontier",
    "demo": "rsa-jax demo --seeds 0 --quick",
    "demo-real": "rsa-jax demo-real --quick --out runs/demo_real_quick",
    "toy-data": "rsa-jax toy-data runs/tiny_data.jsonl --rows 128",
    "compile": "rsa-jax compile configs/rsa_cvar.yaml --topology v5p-8 model.path=llama-2-7b \\\n"
    "    mesh.data=1 mesh.fsdp=4",
}


def _version() -> str:
    from rsa_jax import __version__

    return __version__


def _shard_size(text: str) -> int:
    from rsa_jax.models import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the written weights (default: float32)",
    )
    p.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default="5GB",
        help="split the weights into shards of at most this size, e.g. 2GB or 500MB, with a "
        "model.safetensors.index.json (default: 5GB)",
    )


def _add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="compute dtype (default: a run's model.compute_dtype, float32 for a Hugging Face "
        "directory); the weights are float32 either way",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsa-jax",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    verbose = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `-v` after the command must not reset a `-v` given before it.
    verbose.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log progress (INFO) and show the traceback of an error",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress (INFO) and show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog="example:\n  " + _EXAMPLES[name] + "\n",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[verbose],
        )

    p = command("train", "train (resumes from the run directory automatically)")
    p.add_argument("config", help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.learning_rate=1e-5")
    p.set_defaults(fn=_cmd_train)

    p = command(
        "compile",
        "compile a config's programs for a TPU slice (no TPU, no weights) and report per-chip "
        "memory, FLOPs, collectives and compile time; exit 1 when one does not fit",
    )
    p.add_argument("config", help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.path=llama-3-8b")
    p.add_argument("--topology", required=True, help="Cloud TPU slice, e.g. v5p-8, v5e-16, v6e-8")
    p.add_argument("--slices", type=int, default=1, help="slices of that topology (default 1)")
    p.add_argument(
        "--sweep",
        type=int,
        metavar="K",
        help="compile the vmap sweep's step for K variants instead of the train steps",
    )
    p.add_argument(
        "--variant-devices",
        type=int,
        metavar="V",
        help="with --sweep: devices along the sweep's variant axis (the sweep file's "
        "variant_devices; default: one device)",
    )
    p.add_argument(
        "--no-sampler",
        action="store_true",
        help="skip the evaluation sampler's program (compiled by default, without --sweep)",
    )
    p.add_argument(
        "--eval-rows",
        type=int,
        metavar="R",
        help="rows an evaluation samples in all, prompts x samples (default 1024); a batch "
        "holds as many as eval's memory budget allows",
    )
    p.add_argument(
        "--eval-max-new-tokens",
        type=int,
        metavar="N",
        help="the sampler's new tokens per row (default 64, eval's --max-new-tokens)",
    )
    p.add_argument(
        "--collectives-detail",
        type=int,
        default=0,
        metavar="N",
        help="also list each program's N largest collectives per step, with the loop counts "
        "that multiply them and the JAX op each comes from (where the bytes are spent)",
    )
    p.set_defaults(fn=_cmd_compile)

    p = command("check-config", "load, validate and print the resolved config")
    p.add_argument("config", help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.beta=0.05")
    p.set_defaults(fn=_cmd_check)

    p = command("merge", "weight-average two policies (RSA(P) / P-SACPO)")
    p.add_argument("first", help="theta_a: a run directory, RUN@STAGE (index or name), or HF dir")
    p.add_argument("second", help="theta_b: a run directory, RUN@STAGE, or HF directory")
    p.add_argument("--q", type=float, default=0.5, help="theta = (1-q) a + q b")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    _add_export_options(p)
    p.set_defaults(fn=_cmd_merge)

    p = command(
        "export", "write the latest policy of a run as a Hugging Face safetensors directory"
    )
    p.add_argument("run_dir", help="the train.run_dir of a trained run")
    p.add_argument("out", help="output directory")
    p.add_argument("--stage", help="the policy a stage ended with (index or name); default: last")
    p.add_argument(
        "--peft",
        action="store_true",
        help="LoRA runs: write the adapters alone in PEFT's layout instead of the merged model",
    )
    p.add_argument(
        "--base",
        metavar="DIR",
        help="LoRA runs: merge the adapters into this float Hugging Face base (PEFT's "
        "merge_and_unload) instead of the base they trained on; for a QLoRA run that is "
        "another model than the trained one",
    )
    _add_export_options(p)
    p.set_defaults(fn=_cmd_export)

    p = command("eval", "sample N responses per prompt, score them, report tail-risk metrics")
    p.add_argument("models", nargs="+", help="HF model directories or run directories")
    p.add_argument("--task", choices=["safety"], help="the synthetic safety task's oracles")
    p.add_argument("--scorer", help="a user scorer, module:attr (see rsa_jax.eval.Scorer)")
    p.add_argument(
        "--prompts",
        help="shipped prompt sets, comma-separated (harmbench,donotanswer,benign), or a file: "
        "JSON Lines (field 'prompt') or text, one per line",
    )
    p.add_argument(
        "--judge",
        help="refusal, reward=DIR, cost=DIR, comma-separated (docs/judges.md); refusal needs "
        "shipped --prompts",
    )
    p.add_argument(
        "--split",
        choices=["train", "heldout", "all"],
        default="heldout",
        help="which prompts of the shipped sets (fixed per prompt; default heldout)",
    )
    p.add_argument(
        "--prompt-limit", type=int, help="only the first K prompts of each shipped set (smoke)"
    )
    p.add_argument(
        "--catastrophe-threshold",
        type=float,
        default=0.0,
        help="a cost model's score at or above which a sample is catastrophic (Beaver: 0)",
    )
    p.add_argument(
        "--judge-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="score models' weights and compute",
    )
    p.add_argument("--progress", action="store_true", help="progress bars even off a terminal")
    p.add_argument("--reference", help="model for the KL estimate (e.g. the SFT model)")
    p.add_argument(
        "--template",
        help="prompt template with {prompt}; default: a run's own training template, else the "
        "task's, else the model's chat template",
    )
    _add_dtype_option(p)
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

    # Defaults None: generate_text's own (rsa_jax.generate; the help repeats them, and
    # tests/test_generate_cli.py checks that it does), without importing JAX for --help.
    p = command("generate", "sample answers to prompts from a run or a Hugging Face directory")
    p.add_argument("model", help="a run directory, RUN@STAGE, or a Hugging Face model directory")
    p.add_argument("--stage", help="a run's policy at the end of this stage (index or name)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompt.add_argument("--prompts", help="JSON Lines (field 'prompt') or text, one per line")
    p.add_argument(
        "--template",
        help="prompt template with {prompt}; default: a run's own training template, else the "
        "model's chat template",
    )
    p.add_argument("--temperature", type=float, help="0: greedy (default 0.7)")
    p.add_argument("--top-p", type=float, help="nucleus mass (default 0.95)")
    p.add_argument("--top-k", type=int, help="keep the k most likely (default 0: off)")
    p.add_argument("--max-new-tokens", type=int, help="most tokens per answer (default 256)")
    p.add_argument("--samples", "-n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--seed", type=int, help="row r samples with fold_in(key(seed), r) (default 0)")
    p.add_argument("--batch-size", type=int, help="rows sampled at once (default 32)")
    _add_dtype_option(p)
    p.add_argument("--out", help="write here instead of stdout (JSON Lines unless --format text)")
    p.add_argument(
        "--format",
        choices=["text", "jsonl"],
        help="text (default on stdout) or one JSON object per answer (default with --out)",
    )
    p.set_defaults(fn=_cmd_generate)

    p = command("sweep", "train the variants of a sweep file, then one results table")
    p.add_argument("sweep", help="sweep YAML (configs/sweeps/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every variant")
    p.add_argument("--mode", choices=["sequential", "vmap"], help="overrides the file's mode")
    p.add_argument("--run-dir", help="overrides the file's run_dir")
    p.add_argument("--dry-run", action="store_true", help="print the variants, train nothing")
    p.set_defaults(fn=_cmd_sweep)

    p = command("frontier", "reward-cost frontiers and constrained optima from results.json files")
    p.add_argument("dirs", nargs="+", help="demo, sweep or eval directories (or results.json)")
    p.add_argument("--constraint", action="append", default=[], help="e.g. catastrophic_rate<=0.01")
    p.add_argument("--out", help="directory for frontier.{md,json} and one plot per statistic")
    p.add_argument("--methods", nargs="+", default=(), help="only these methods")
    p.add_argument(
        "--method-key",
        action="append",
        default=[],
        help="sweeps: an override key whose value names the method (stages.1.risk)",
    )
    p.set_defaults(fn=_cmd_frontier)

    p = command(
        "demo", "the synthetic safety task end to end: methods compared by frontiers (make demo)"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="e.g. --seeds 0 1 2")
    p.add_argument(
        "--constraint",
        action="append",
        default=[],
        metavar="STAT<=ZETA",
        help="Algorithm 1's constraint (repeatable); default: the SFT model's own "
        "catastrophic_rate and cost_cvar_0.9 (no worse than SFT)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--task", help="task settings YAML (configs/tasks/); default: the built-in task")
    p.add_argument("--configs", default="configs", help="directory of the method configs")
    p.add_argument(
        "--report-to",
        nargs="+",
        default=[],
        choices=["tensorboard", "wandb", "mlflow"],
        help="experiment trackers of every run (train.report_to); wandb/mlflow also get the "
        "frontier report and plots as artifacts",
    )
    p.add_argument(
        "--candidates-every",
        type=int,
        metavar="STEPS",
        help="keep each method's policy every STEPS steps of each stage as a frontier candidate, "
        "so the frontiers span KL; 0: only the final policies (default: "
        "DemoConfig.candidates_every in rsa_jax/demo.py; --quick: 5)",
    )
    p.set_defaults(fn=_cmd_demo)

    p = command(
        "demo-real",
        "SmolLM2-135M-Instruct aligned on its own samples to real prompts by every method, judged "
        "on held-out prompts (make demo-real)",
    )
    p.add_argument("--out", default="runs/demo_real")
    p.add_argument("--model", default="artifacts/smollm2-135m", help="a local HF model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="toy sizes (a smoke run, minutes)")
    p.add_argument("--configs", default="configs", help="directory of the method configs")
    p.set_defaults(fn=_cmd_demo_real)

    p = command("toy-data", "write synthetic PKU-SafeRLHF-schema rows (smoke tests)")
    p.add_argument("path")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_toy_data)
    parser.description = _DESCRIPTION.format(commands=", ".join(sub.choices))
    return parser


class CommandLineError(Exception):
    """A bad argument found before any work; the message says what is wrong and what to do."""


def _check_run_dir(path: str, what: str, *, hf_ok: bool = False) -> None:
    """`path` is a trained run directory (or, with `hf_ok`, RUN@STAGE or a Hugging Face
    directory): `rsa_jax.training.resolve_source` decides, for every command alike."""
    from rsa_jax.training import SourceError, resolve_source

    try:
        resolve_source(path, what=what, hf_ok=hf_ok)
    except (SourceError, ValueError) as e:
        raise CommandLineError(str(e)) from None


def _check_arguments(args) -> None:
    """Checks of paths and values that argparse cannot express, before anything is imported."""
    if args.command == "export":
        _check_run_dir(args.run_dir, "run directory")
    elif args.command == "merge":
        if not 0 <= args.q <= 1:
            raise CommandLineError(f"--q must lie in [0, 1], got {args.q}")
        _check_run_dir(args.first, "first policy", hf_ok=True)
        _check_run_dir(args.second, "second policy", hf_ok=True)
    if args.command == "compile":
        for flag, value in (
            ("--eval-rows", args.eval_rows),
            ("--eval-max-new-tokens", args.eval_max_new_tokens),
        ):
            if value is not None and value < 1:
                raise CommandLineError(f"{flag} must be >= 1, got {value}")
    if args.command == "eval":
        # Existence only here: what each model is, `load_model` resolves (resolve_source).
        from etils import epath

        from rsa_jax.training import split_source

        for path in [*args.models, *([args.reference] if args.reference else [])]:
            run, _ = split_source(path)
            if not epath.Path(run).exists():
                raise CommandLineError(
                    f"model {path!r} does not exist: pass a run directory, RUN@STAGE or a "
                    "Hugging Face model directory"
                )
        if args.prompts and not (
            os.path.isfile(args.prompts) or _prompt_set_names(args.prompts) is not None
        ):
            raise CommandLineError(
                f"--prompts {args.prompts!r}: no such file, and not a list of shipped prompt "
                "sets (harmbench, donotanswer, benign)"
            )
        if args.prompt_limit is not None and args.prompt_limit < 1:
            raise CommandLineError(f"--prompt-limit must be >= 1, got {args.prompt_limit}")
    if args.command == "generate":
        if not os.path.exists(args.model) and not os.path.isdir(args.model.rpartition("@")[0]):
            raise CommandLineError(
                f"model {args.model!r} does not exist: pass a run directory, RUN@STAGE or a "
                "Hugging Face model directory"
            )
        if args.prompts and not os.path.isfile(args.prompts):
            raise CommandLineError(f"--prompts {args.prompts!r}: no such file")
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise CommandLineError(f"--{name.replace('_', '-')} must be >= 1")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise CommandLineError(f"--top-p must lie in (0, 1], got {args.top_p}")
        if args.temperature is not None and args.temperature < 0:
            raise CommandLineError(f"--temperature must be >= 0 (0 is greedy): {args.temperature}")
    if args.command == "sweep" and not os.path.isfile(args.sweep):
        raise CommandLineError(f"sweep file {args.sweep!r} does not exist")


def _one_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, with its type when that says more."""
    text = str(error).strip()
    if isinstance(error, KeyError) and error.args:
        text = f"missing key {error.args[0]!r}"
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first or type(error).__name__


def _hint(error: BaseException) -> str:
    """What to do, when the message itself does not say it ("" then)."""
    from rsa_jax.data import DataError

    if isinstance(error, DataError):
        if error.line:
            return "fix the row, or set data.on_error=skip to skip and count bad rows"
        return ""  # the file itself: the message says what is wrong with it
    training = sys.modules.get("rsa_jax.training")  # loaded when a checkpoint was written
    if training is not None and isinstance(error, training.CheckpointWriteError):
        return ""  # the message says what to do
    if isinstance(error, PermissionError):
        return "check the permissions of the named path"
    if isinstance(error, OSError) and error.errno == 28:  # ENOSPC
        return "free disk space and rerun"
    if isinstance(error, OSError) and error.filename:
        return "check the path"
    if isinstance(error, (FileNotFoundError, ValueError)):
        return ""  # our own messages name the key or path and what is expected
    return "rerun with -v for the traceback"


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit code (see _EPILOG). Errors print one line to stderr
    (`rsa-jax COMMAND: error: ...`), with the traceback above it under -v."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `compile CONFIG --topology T overrides...`: overrides after the options
        if args.command != "compile" or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    verbose = getattr(args, "verbose", False)
    if not verbose:  # transformers' "PyTorch was not found" advice: we never use torch models
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Orbax logs every file it writes (INFO), and a failed write as ERROR records with the
    # traceback of each of its background threads; that failure reaches this thread as the
    # exception reported below in one line, so without -v those records are noise.
    logging.getLogger("absl").setLevel(logging.WARNING if verbose else logging.CRITICAL)
    prefix = f"rsa-jax {args.command}"
    try:
        _check_arguments(args)
        return args.fn(args)
    except CommandLineError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:
        if isinstance(e.code, str):  # a command's `raise SystemExit(message)`: same one-line form
            message = e.code.removeprefix(f"{args.command}: ")
            raise SystemExit(f"{prefix}: error: {message}") from None
        raise
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- every error ends as one line (traceback under -v)
        from rsa_jax.config import ConfigError

        if verbose:
            traceback.print_exc()
        if isinstance(e, ConfigError):
            print(f"{prefix}: config error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        hint = _hint(e)
        if verbose and hint.startswith("rerun with -v"):
            hint = "the traceback is above"
        kind = "error" if isinstance(e, (ValueError, OSError)) else type(e).__name__
        print(f"{prefix}: {kind}: {_one_line(e)}" + (f" ({hint})" if hint else ""), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
