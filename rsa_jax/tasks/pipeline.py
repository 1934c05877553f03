"""The main job end to end on the synthetic safety task (what `make demo` runs).

Per seed: SFT a tiny Llama from scratch on the task's behaviour -> sample two responses per
training prompt from the SFT model and label them with the exact oracles (helpfulness pairs by R,
safety pairs by C, PKU-SafeRLHF schema) -> train DPO, SACPO, RSA-CVaR and RSA-ERM from the same
SFT model on the same pairs, each with the stages of its file in `configs/` (only sizes, paths and
the learning rate are overridden) -> evaluate the SFT model and every method on held-out prompts
with N samples each. Then one table over seeds (mean and a t-interval across seeds) and the
plots: the reward-cost plane and the tail of the cost distribution.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time

import numpy as np

from rsa_jax.tasks.safety import TEMPLATE, OracleScorer, SafetyTask, label_pairs, write_pairs
from rsa_jax.tasks.sft import SFTConfig, train_sft

log = logging.getLogger(__name__)

# Method name -> the config file whose stages it runs.
METHODS = {
    "DPO": "dpo.yaml",
    "SACPO": "sacpo.yaml",
    "RSA-CVaR": "rsa_cvar.yaml",
    "RSA-ERM": "rsa_erm.yaml",
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "runs/demo"
    configs_dir: str = "configs"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    # The SFT recipe's own default: fewer steps leave the model blind to the prompt's style.
    sft_steps: int = SFTConfig.steps
    # Task settings (configs/tasks/*.yaml); None: the default SafetyTask().
    task_file: str | None = None
    # Prompt draws for preference pairs (two SFT samples each; ties on a criterion are dropped).
    pair_prompts: int = 2048
    # Preference training: pairs per step, passes over each stage's pairs, peak learning rate.
    batch_size: int = 32
    epochs: int = 2
    learning_rate: float = 1e-4
    # Evaluation: samples per held-out prompt, and the token budget of a sample: twice the
    # longest response in the data, so a policy that has learnt never to stop shows it.
    eval_samples: int = 32
    eval_max_tokens: int = 20
    n_boot: int = 1000
    extra_overrides: tuple[str, ...] = ()


def _say(message: str) -> None:
    print(message, flush=True)


def make_pairs(task, sft_dir, prompts, draws, seed, data_dir):
    """Samples two SFT responses per drawn prompt, labels them, writes the two pair files."""
    from rsa_jax.eval import load_model, sample

    rng = np.random.default_rng(seed + 1000)
    drawn = [prompts[i] for i in rng.integers(0, len(prompts), draws)]
    model, tokenizer = load_model(sft_dir)
    samples = sample(
        model,
        tokenizer,
        drawn,
        n=2,
        max_new_tokens=task.max_response_tokens(),
        seed=seed + 2000,
        template=TEMPLATE,
    )
    first, second = samples.texts[0::2], samples.texts[1::2]
    helpful, safety, counts = label_pairs(task, drawn, first, second, rng=rng)
    paths = {
        "helpfulness": os.path.join(data_dir, "helpfulness.jsonl"),
        "safety": os.path.join(data_dir, "safety.jsonl"),
    }
    write_pairs(paths["helpfulness"], helpful)
    write_pairs(paths["safety"], safety)
    counts.update(helpfulness_pairs=len(helpful), safety_pairs=len(safety))
    counts["unfinished_samples"] = int((~samples.finished).sum())
    with open(os.path.join(data_dir, "counts.json"), "w") as f:
        json.dump(counts, f, indent=2)
    return paths, counts


def demo_task(demo: DemoConfig) -> SafetyTask:
    return SafetyTask.from_yaml(demo.task_file) if demo.task_file else SafetyTask()


def method_config(demo: DemoConfig, method: str, sft_dir: str, paths: dict, seed: int, run_dir):
    from rsa_jax.config import load_config

    task = demo_task(demo)
    overrides = [
        f"model.path={sft_dir}",
        "model.compute_dtype=float32",
        "model.remat=false",
        f"data.template='{TEMPLATE}'",
        "data.max_prompt_len=5",
        f"data.max_response_len={task.max_response_tokens()}",
        f"data.batch_size={demo.batch_size}",
        f"data.epochs={demo.epochs}",
        f"data.seed={seed}",
        "data.read_threads=0",
        f"optim.learning_rate={demo.learning_rate}",
        "optim.warmup_ratio=0.1",
        "optim.microbatches=1",
        "checkpoint.every=0",
        "checkpoint.async_save=false",
        f"train.run_dir={run_dir}",
        f"train.seed={seed}",
        "train.chunk_size=16",
        "train.progress_bar=false",
        "mesh.data=-1",
    ]
    base = load_config(os.path.join(demo.configs_dir, METHODS[method]), check=False)
    for i, stage in enumerate(base.stages):
        overrides.append(f"stages.{i}.data_path={paths[stage.view]}")
    return load_config(
        os.path.join(demo.configs_dir, METHODS[method]), overrides + list(demo.extra_overrides)
    )


def evaluate_dir(model_dir_or_run, prompts, reference, demo: DemoConfig, *, seed, task):
    """(SampleScores, sampling info) of one model (an HF directory or a run directory), sampled
    with the demo's evaluation settings (eval_samples per prompt, eval_max_tokens)."""
    from rsa_jax.eval import evaluate_model, load_model

    model, tokenizer = load_model(model_dir_or_run)
    scores, sampled = evaluate_model(
        model,
        tokenizer,
        prompts,
        OracleScorer(task),
        reference=reference,
        n=demo.eval_samples,
        max_new_tokens=demo.eval_max_tokens,
        seed=seed,
        template=TEMPLATE,
    )
    info = dict(
        unfinished=float(np.mean(~sampled.finished)),
        mean_length=float(np.mean(sampled.lengths)),
    )
    return scores, info


def _fresh_unless_same(directory: str, name: str, text: str) -> None:
    """Keeps `directory` (a finished or interrupted run resumes) only if its `name` file says it
    was made with exactly `text`; otherwise removes it, so a changed setting never reuses it."""
    path = os.path.join(directory, name)
    if not os.path.isdir(directory):
        return
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    _say(f"{directory}: made with other settings; starting it afresh")
    shutil.rmtree(directory)


def run_seed(demo: DemoConfig, seed: int) -> dict:
    """One full replication; returns {method: SampleScores} (the SFT model included)."""
    from rsa_jax.config import to_json
    from rsa_jax.models import load_hf
    from rsa_jax.training import absolute_paths, train

    task = demo_task(demo)
    root = os.path.join(demo.out_dir, f"seed{seed}")
    train_prompts, test_prompts = task.split_prompts(seed=seed)
    sft_dir = os.path.join(root, "sft")
    t0 = time.perf_counter()
    sft_config = SFTConfig(steps=demo.sft_steps, seed=seed)
    sft_key = json.dumps(
        {**dataclasses.asdict(sft_config), "task": dataclasses.asdict(task)}, sort_keys=True
    )
    _fresh_unless_same(sft_dir, "sft_config.json", sft_key)
    if not os.path.exists(os.path.join(sft_dir, "model.safetensors")):
        summary = train_sft(task, sft_dir, train_prompts, sft_config)
        with open(os.path.join(sft_dir, "sft_config.json"), "w") as f:
            f.write(sft_key)
        for method in demo.methods:  # trained from another SFT model: their configs match
            stale = os.path.join(root, method)  # the new one's, so they must not be reused
            if os.path.isdir(stale):
                _say(f"{stale}: trained from an earlier SFT model; starting it afresh")
                shutil.rmtree(stale)
        _say(
            f"[seed {seed}] SFT: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
            f"in {summary['seconds']:.0f} s"
        )
    paths, counts = make_pairs(
        task, sft_dir, train_prompts, demo.pair_prompts, seed, os.path.join(root, "data")
    )
    _say(
        f"[seed {seed}] pairs: {counts['helpfulness_pairs']} helpfulness, "
        f"{counts['safety_pairs']} safety from {counts['pairs']} sampled pairs "
        f"(left out: ties {counts['helpfulness_ties']} on reward, {counts['safety_ties']} on "
        f"cost; {counts['empty_response']} with an empty response)"
    )
    for method in demo.methods:
        t1 = time.perf_counter()
        run_dir = os.path.join(root, method)
        config = method_config(demo, method, sft_dir, paths, seed, run_dir)
        _fresh_unless_same(run_dir, "config.json", to_json(absolute_paths(config)))
        result = train(config)
        _say(
            f"[seed {seed}] {method}: {result.status} after {result.global_step} steps "
            f"({time.perf_counter() - t1:.0f} s)"
        )
    reference = load_hf(sft_dir)
    scores, infos = {}, {}
    for name in ("SFT", *demo.methods):
        target = sft_dir if name == "SFT" else os.path.join(root, name)
        scores[name], infos[name] = evaluate_dir(
            target, test_prompts, reference, demo, seed=seed, task=task
        )
        _say(
            f"[seed {seed}] {name}: mean length {infos[name]['mean_length']:.1f} tokens, "
            f"{100 * infos[name]['unfinished']:.1f}% of samples hit {demo.eval_max_tokens} "
            "tokens without EOS"
        )
    with open(os.path.join(root, "samples_info.json"), "w") as f:
        json.dump(infos, f, indent=2)
    _say(f"[seed {seed}] done in {time.perf_counter() - t0:.0f} s")
    return scores


def _concat(parts):
    """One SampleScores from several seeds' (prompt indices kept apart per seed)."""
    from rsa_jax.eval import SampleScores

    offsets = np.cumsum([0] + [int(p.prompt.max()) + 1 for p in parts[:-1]])
    return SampleScores(
        prompt=np.concatenate([p.prompt + o for p, o in zip(parts, offsets, strict=True)]),
        reward=np.concatenate([p.reward for p in parts]),
        cost=np.concatenate([p.cost for p in parts]),
        catastrophic=np.concatenate([p.catastrophic for p in parts]),
        logratio=None
        if any(p.logratio is None for p in parts)
        else np.concatenate([p.logratio for p in parts]),
    )


def run_demo(demo: DemoConfig) -> dict:
    """All seeds, then the table and plots in `out_dir`. Returns the aggregated rows."""
    from rsa_jax.eval import (
        aggregate_seeds,
        results_table,
        seeds_interval,
        tail_metrics,
        write_results,
    )

    os.makedirs(demo.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    per_seed_rows, pooled = [], {}
    for seed in demo.seeds:
        scores = run_seed(demo, seed)
        rows = {m: tail_metrics(s, n_boot=demo.n_boot, seed=seed) for m, s in scores.items()}
        write_results(os.path.join(demo.out_dir, f"seed{seed}"), rows, scores)
        per_seed_rows.append(rows)
        for m, s in scores.items():
            pooled.setdefault(m, []).append(s)
    pooled = {m: _concat(v) for m, v in pooled.items()}
    if len(per_seed_rows) > 1:
        rows = aggregate_seeds(per_seed_rows)
        write_results(demo.out_dir, rows, pooled, interval=seeds_interval(len(per_seed_rows)))
    else:
        rows = per_seed_rows[0]
        write_results(demo.out_dir, rows, pooled)
    with open(os.path.join(demo.out_dir, "demo_config.json"), "w") as f:
        json.dump(dataclasses.asdict(demo), f, indent=2)
    _say("")
    _say(
        f"Mean over seeds; intervals: {seeds_interval(len(per_seed_rows))}."
        if len(per_seed_rows) > 1
        else "Intervals: 95% prompt bootstrap."
    )
    _say(results_table(rows))
    _say(
        f"\n{len(demo.seeds)} seed(s) in {time.perf_counter() - t0:.0f} s; table, plots and "
        f"per-seed results in {demo.out_dir}/"
    )
    return rows
