"""The main job end to end on the synthetic safety task (what `make demo` runs): every method as
a family of variants, compared by reward-cost frontiers and Algorithm 1's constrained choice.

Per seed: SFT a tiny Llama from scratch on the task's behaviour -> sample two responses per
training prompt from the SFT model and label them with the exact oracles (helpfulness pairs by R,
safety pairs by C, PKU-SafeRLHF schema) -> train every method's variants from the same SFT model
on the same pairs, each with the stages of its file in `configs/` (only sizes, paths, the
learning rate and the swept beta are overridden):

  * DPO (one stage): beta_1 over `betas`, one vmap sweep of K = len(betas) variants;
  * the two-stage methods (SACPO, RSA-CVaR, RSA-CVaR-v2 = RSA-CVaR with stage-loss version 2 in
    both stages, RSA-ERM): beta_2, the safety stage's beta, over `betas`. Stage 1 is the same for
    every beta_2, so `rsa_jax.sweep.run_vmap` trains it once and vmaps stage 2 only, with the
    stage-1 policy as the one shared reference;
  * RSA(P) / P-SACPO: merges `theta_P = (1 - q) theta_1 + q theta_2` of the stage-1 policy and
    the final policy at each beta_2 in `merge_betas`, q in `merge_qs` (evaluated, not trained;
    each written as a Hugging Face directory). They are candidates of their method, as in
    Algorithm 1 (docs/method.md: the candidates are the beta_2 values and the merge ratios), so
    they join its frontier and its constrained choice as variants `(P) b2=... q=...`;
  * points along training (`candidates_every`, the config's `checkpoint.candidates_every`):
    every that many steps of each stage the policy is kept and joins its method's candidates
    (`s1@20`, `s1@end`, `b2=0.1 s2@20`; `candidate_targets`), so each method's frontier spans a
    range of KL from the SFT model and two methods' frontiers vs KL overlap: the frontier
    report's reward gap at equal KL compares them at the same distance from the reference;

-> evaluate the SFT model and every variant on the held-out prompts with N samples each (the same
sampling seed for all, so variants differ by their policies, not by their draws) ->
`seed<k>/results.json`, one row per variant (`SACPO b2=0.05`, `SACPO (P) b2=0.1 q=0.5`,
`DPO b1=0.1`: what `rsa_jax.eval.load_frontier_inputs` reads). After all seeds: the frontier
report (`rsa_jax.eval.run_frontier`: frontiers per cost statistic and vs KL, reward gaps at equal
cost, plots, the constrained optima) in `frontier/`, and the one-point-per-method table of earlier
versions (each method at its config's own beta, 0.1) with its two plots.
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


@dataclasses.dataclass(frozen=True)
class Method:
    """A method of the demo: the config file whose stages it runs, and overrides of its own."""

    config: str
    overrides: tuple[str, ...] = ()


METHODS = {
    "DPO": Method("dpo.yaml"),
    "SACPO": Method("sacpo.yaml"),
    "RSA-CVaR": Method("rsa_cvar.yaml"),
    # Version 2 of the stage loss (stop-gradient on the chosen side's risk term, method.md):
    # version 1 rewards growing the chosen side's risk term.
    "RSA-CVaR-v2": Method("rsa_cvar.yaml", ("stages.0.version=2", "stages.1.version=2")),
    "RSA-ERM": Method("rsa_erm.yaml"),
}
MERGED = "(P)"  # the variant prefix of a method's merges: row "SACPO (P) b2=0.1 q=0.5"
FRONTIER_DIR = "frontier"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "runs/demo"
    configs_dir: str = "configs"
    seeds: tuple[int, ...] = (0,)
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
    # The swept temperature: the last stage's beta (beta_2; DPO's only beta_1). Both sides of
    # beta_1 = 0.1 (docs/method.md: a tighter constraint means a smaller beta_2 under SACPO's
    # derivation, a larger one is RSA's reconstructed Lagrangian's other side).
    betas: tuple[float, ...] = (0.2, 0.1, 0.05, 0.025, 0.01)
    # RSA(P): which beta_2 runs are merged with their stage-1 policy, and the merge ratios q.
    merge_betas: tuple[float, ...] = (0.1, 0.01)
    merge_qs: tuple[float, ...] = (0.25, 0.5, 0.75)
    # Points along training (`checkpoint.candidates_every`): every this many steps of each
    # stage the policy joins its method's candidates, so each frontier spans KL instead of
    # clustering at the end of training; 0: none. Stage-1 points (shared by all beta_2) and the
    # end of stage 1 join once per method, stage-2 points (and DPO's) those of
    # `candidate_betas` only (each point is one more model to evaluate).
    candidates_every: int = 20
    candidate_betas: tuple[float, ...] = (0.1,)
    # Algorithm 1's constraints (STAT<=ZETA); empty: derived from the SFT model
    # (`default_constraints`).
    constraints: tuple[str, ...] = ()
    # Evaluation: samples per held-out prompt, and the token budget of a sample: twice the
    # longest response in the data, so a policy that has learnt never to stop shows it.
    eval_samples: int = 32
    eval_max_tokens: int = 20
    n_boot: int = 1000
    extra_overrides: tuple[str, ...] = ()
    # Experiment trackers (train.report_to) of every training run; wandb / mlflow also get the
    # frontier report and plots as artifacts of the demo's own tracker run.
    report_to: tuple[str, ...] = ()

    def __post_init__(self):
        from rsa_jax.config import check_finite

        try:
            check_finite(self)
        except ValueError as e:
            raise ValueError(f"demo: {e}") from None
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"demo: unknown method(s) {unknown}; known: {list(METHODS)}")
        if not self.betas:
            raise ValueError("demo: betas is empty")
        stray = [b for b in self.merge_betas if b not in self.betas]
        if stray:
            raise ValueError(f"demo: merge_betas {stray} are not among betas {self.betas}")
        stray = [b for b in self.candidate_betas if b not in self.betas]
        if stray:
            raise ValueError(f"demo: candidate_betas {stray} are not among betas {self.betas}")
        if self.candidates_every < 0:
            raise ValueError(f"demo: candidates_every {self.candidates_every} must be >= 0")
        if any(not 0 < q < 1 for q in self.merge_qs):
            raise ValueError(f"demo: merge_qs {self.merge_qs} must lie strictly between 0 and 1")


def _say(message: str) -> None:
    print(message, flush=True)


class _Clock:
    """Wall and process CPU seconds (all threads) since it was made. The demo prints both per
    part and keeps them in `seed<k>/timings.json`: CPU seconds grow far less than wall seconds
    when other processes load the machine, so they are what sizes the demo for an idle one."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> dict[str, float]:
        return {
            "wall_s": round(time.perf_counter() - self.wall, 2),
            "cpu_s": round(time.process_time() - self.cpu, 2),
        }

    def __str__(self) -> str:
        t = self.seconds()
        return f"{t['wall_s']:.0f} s, CPU {t['cpu_s']:.0f} s"


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


def stage_data_overrides(config_path: str, paths: dict) -> list[str]:
    """`stages.N.data_path=...` for every stage of the config file at `config_path`, from
    `paths` ({"helpfulness": file, "safety": file}) by the stage's view: its own `view`, else
    `data.view`, where "auto" (PKU-SafeRLHF rows by better_response_id) is the helpfulness file.

    Raises:
      ValueError: a stage's view has no file in `paths`.
    """
    from rsa_jax.config import load_config, stage_data

    file_config = load_config(config_path, check=False)
    out = []
    for i, stage in enumerate(file_config.stages):
        view = stage_data(file_config, stage).view
        key = "helpfulness" if view == "auto" else view
        if key not in paths:
            raise ValueError(
                f"{config_path}: stage {i} ({stage.name}) reads the {view!r} view, but the demo "
                f"wrote only {sorted(paths)} pair files"
            )
        out.append(f"stages.{i}.data_path={paths[key]}")
    return out


def method_config(
    demo: DemoConfig, method: str, sft_dir: str, paths: dict, seed: int, run_dir, extra=()
):
    """The method's config file with the demo's sizes, paths and learning rate, the method's
    own overrides (`METHODS`), then `extra` (the swept beta) and `demo.extra_overrides`."""
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
        f"checkpoint.candidates_every={demo.candidates_every}",
        f"train.run_dir={run_dir}",
        f"train.seed={seed}",
        "train.chunk_size=16",
        "train.progress_bar=false",
        "mesh.data=-1",
    ]
    path = os.path.join(demo.configs_dir, METHODS[method].config)
    overrides += stage_data_overrides(path, paths)
    if demo.report_to:
        overrides.append(f"train.report_to=[{','.join(demo.report_to)}]")
    overrides += [*METHODS[method].overrides, *extra, *demo.extra_overrides]
    return load_config(path, overrides)


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


def _run_key(stages: int, beta: float) -> tuple[str, str]:
    """(the variant's row name after the method, its directory name) for the last stage's
    beta: `b1=0.1` for a one-stage method, `b2=0.05` for a two-stage one."""
    return f"b{stages}={beta:g}", f"b{stages}_{beta:g}"


def family_variants(demo: DemoConfig, method: str, sft_dir: str, paths: dict, seed: int, root):
    """{beta: sweep Variant} of one method: its config at each of `demo.betas` for the last
    stage's beta, run directories `root/<method>/b<stages>_<beta>`."""
    from rsa_jax.config import load_config
    from rsa_jax.sweep import Variant, format_value

    path = os.path.join(demo.configs_dir, METHODS[method].config)
    last = len(load_config(path, check=False).stages) - 1
    family = {}
    for beta in demo.betas:
        name, directory = _run_key(last + 1, beta)
        run_dir = os.path.join(root, method, directory)
        extra = (f"stages.{last}.beta={format_value(float(beta))}",)
        config = method_config(demo, method, sft_dir, paths, seed, run_dir, extra=extra)
        family[beta] = Variant(name=name, overrides=extra, config=config)
    return family


def train_family(method: str, family: dict, seed: int) -> dict[str, float]:
    """Trains a method's variants as one vmap sweep (stage 1 once if they share it). A variant
    made with other settings, or left unfinished, is started afresh; finished ones are kept.
    Returns the wall and CPU seconds it took."""
    from rsa_jax.config import to_json
    from rsa_jax.sweep import Sweep, is_done, run_vmap
    from rsa_jax.training import RunDir, absolute_paths

    variants = list(family.values())
    for v in variants:
        _fresh_unless_same(v.run_dir, RunDir.CONFIG, to_json(absolute_paths(v.config)))
        if os.path.isdir(v.run_dir) and not is_done(v):
            shutil.rmtree(v.run_dir)  # vmap mode restarts unfinished variants from scratch
    clock = _Clock()
    parent = os.path.dirname(variants[0].run_dir)
    sweep = Sweep(parent, METHODS[method].config, (), tuple(variants), "vmap", parent, None)
    status = run_vmap(sweep)
    trained = sum(1 for x in status.values() if x == "done")
    _say(
        f"[seed {seed}] {method}: {trained} variant(s) trained, {len(status) - trained} kept "
        f"({clock})"
    )
    return clock.seconds()


def write_merges(demo: DemoConfig, method: str, family: dict, root: str) -> dict[str, str]:
    """RSA(P) of one two-stage method: for each beta_2 in `merge_betas`, the policies
    `(1 - q) theta_1 + q theta_2` for q in `merge_qs`, theta_1 the run's stage-1 policy (`RUN@0`)
    and theta_2 its final one, each saved as a Hugging Face directory under `root/merges/`.
    Rewritten on every call (cheap), so a retrained run never leaves a stale merge.
    Returns {variant row name after the method: directory}."""
    from rsa_jax.models import save_hf
    from rsa_jax.training import load_source, merge_params

    out = {}
    for beta in demo.merge_betas:
        run_dir = family[beta].run_dir
        first, second = load_source(f"{run_dir}@0"), load_source(run_dir)
        for q in demo.merge_qs:
            directory = os.path.join(root, "merges", f"{method}_b2_{beta:g}_q_{q:g}")
            merged = merge_params(first.params, second.params, q)
            save_hf(first.build(merged), directory, tokenizer=first.tokenizer)
            out[f"b2={beta:g} q={q:g}"] = directory
    return out


def candidate_targets(family: dict, betas, stages: int) -> dict[str, str]:
    """The points along training of one method (`checkpoint.candidates_every`) that join its
    candidates: {variant row name after the method: source for `rsa_jax.eval.load_model`}.
    `family` is {beta: Variant} of a sweep over the last stage's beta, `stages` the method's
    stage count. Every stage but the last is the same for all betas (the sweep trains it once),
    so its points (`s1@20`: stage 1 after 20 steps) and its end (`s1@end`, RSA(P) at q = 0)
    join once; the last stage's points join for each of `betas` (`b2=0.1 s2@20`)."""
    from rsa_jax.training import list_candidates

    last = stages - 1
    out = {}
    for beta in betas:
        variant = family[beta]
        for index, step in list_candidates(variant.run_dir):
            name = f"s{index + 1}@{step}"
            out[name if index < last else f"{variant.name} {name}"] = (
                f"{variant.run_dir}@{index}:{step}"
            )
        for index in range(last):
            out[f"s{index + 1}@end"] = f"{variant.run_dir}@{index}"
    return out


def run_seed(demo: DemoConfig, seed: int) -> tuple[dict, dict]:
    """One full replication. Returns ({row: SampleScores} of the SFT model and every variant,
    {method: row} of each method's single point: its config's own last-stage beta). Each
    part's wall and CPU seconds go to `seed<k>/timings.json`."""
    from rsa_jax.models import load_hf
    from rsa_jax.training import RunDir

    task = demo_task(demo)
    root = os.path.join(demo.out_dir, f"seed{seed}")
    train_prompts, test_prompts = task.split_prompts(seed=seed)
    sft_dir = os.path.join(root, "sft")
    total, clock, timings = _Clock(), _Clock(), {}
    sft_config = SFTConfig(steps=demo.sft_steps, seed=seed)
    sft_key = json.dumps(
        {**dataclasses.asdict(sft_config), "task": dataclasses.asdict(task)}, sort_keys=True
    )
    _fresh_unless_same(sft_dir, "sft_config.json", sft_key)
    if not os.path.exists(os.path.join(sft_dir, "model.safetensors")):
        summary = train_sft(task, sft_dir, train_prompts, sft_config)
        with open(os.path.join(sft_dir, "sft_config.json"), "w") as f:
            f.write(sft_key)
        for name in (*METHODS, "merges"):  # trained from another SFT model: their configs
            stale = os.path.join(root, name)  # match the new one's, so they must not be reused
            if os.path.isdir(stale):
                _say(f"{stale}: trained from an earlier SFT model; starting it afresh")
                shutil.rmtree(stale)
        timings["sft"] = clock.seconds()
        _say(
            f"[seed {seed}] SFT: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
            f"({clock})"
        )
    clock = _Clock()
    paths, counts = make_pairs(
        task, sft_dir, train_prompts, demo.pair_prompts, seed, os.path.join(root, "data")
    )
    timings["pairs"] = clock.seconds()
    _say(
        f"[seed {seed}] pairs: {counts['helpfulness_pairs']} helpfulness, "
        f"{counts['safety_pairs']} safety from {counts['pairs']} sampled pairs "
        f"(left out: ties {counts['helpfulness_ties']} on reward, {counts['safety_ties']} on "
        f"cost; {counts['empty_response']} with an empty response) ({clock})"
    )
    targets, single = {"SFT": sft_dir}, {}
    for method in demo.methods:
        if RunDir(os.path.join(root, method)).has_config():  # an earlier version's
            shutil.rmtree(os.path.join(root, method))  # single run in the family's place
        family = family_variants(demo, method, sft_dir, paths, seed, root)
        timings[f"train {method}"] = train_family(method, family, seed)
        for v in family.values():
            targets[f"{method} {v.name}"] = v.run_dir
        if demo.candidates_every:
            found = candidate_targets(family, demo.candidate_betas, _stages(demo, method))
            for name, source in found.items():
                targets[f"{method} {name}"] = source
        own = _own_beta(demo, method)
        if own in family:
            single[method] = f"{method} {family[own].name}"
        if _has_merges(demo, method):
            clock = _Clock()
            merges = write_merges(demo, method, family, root)
            for name, directory in merges.items():
                targets[f"{method} {MERGED} {name}"] = directory
            timings[f"merge {method}"] = clock.seconds()
            _say(f"[seed {seed}] {method} {MERGED}: {len(merges)} merge(s) written ({clock})")
    reference = load_hf(sft_dir)
    scores, infos = {}, {}
    evaluation = _Clock()
    for name, target in targets.items():
        clock = _Clock()
        scores[name], infos[name] = evaluate_dir(
            target, test_prompts, reference, demo, seed=seed, task=task
        )
        timings[f"eval {name}"] = clock.seconds()
        _say(
            f"[seed {seed}] eval {name}: mean length {infos[name]['mean_length']:.1f} tokens, "
            f"{100 * infos[name]['unfinished']:.1f}% of samples hit {demo.eval_max_tokens} "
            f"tokens without EOS ({clock})"
        )
    timings["eval (all)"] = evaluation.seconds()
    _say(f"[seed {seed}] evaluated {len(targets)} models ({evaluation})")
    with open(os.path.join(root, "samples_info.json"), "w") as f:
        json.dump(infos, f, indent=2)
    timings["seed"] = total.seconds()
    with open(os.path.join(root, "timings.json"), "w") as f:
        json.dump({**timings, "load_average": list(os.getloadavg())}, f, indent=2)
    _say(f"[seed {seed}] done ({total}; load average {os.getloadavg()[0]:.1f})")
    return scores, single


def _stages(demo: DemoConfig, method: str) -> int:
    from rsa_jax.config import load_config

    path = os.path.join(demo.configs_dir, METHODS[method].config)
    return len(load_config(path, check=False).stages)


def _has_merges(demo: DemoConfig, method: str) -> bool:
    """RSA(P) merges exist for two-stage methods (stage-1 and final policies) when asked for."""
    return bool(demo.merge_betas and demo.merge_qs) and _stages(demo, method) > 1


def _own_beta(demo: DemoConfig, method: str) -> float:
    """The last stage's beta in the method's own config file (0.1 for all shipped methods)."""
    from rsa_jax.config import load_config

    config = load_config(os.path.join(demo.configs_dir, METHODS[method].config), check=False)
    return config.stages[-1].beta


def default_constraints(sft: dict) -> tuple[str, ...]:
    """Algorithm 1's constraints when none are given, from the SFT model's metrics (its mean
    over seeds), to two significant digits: the aligned policy must be certified (by the upper
    confidence bound) no worse than the SFT model it started from, on the catastrophe rate and
    on `cost_cvar_0.9`, the mean cost of the worst 10% of samples (rude words as well as
    catastrophes; CVaR_0.99 is nearly all catastrophes on this task, so it would restate the
    first). The thresholds scale with the task's base rates."""
    return tuple(
        f"{name}<={float(f'{sft[name].value:.2g}'):g}"
        for name in ("catastrophic_rate", "cost_cvar_0.9")
    )


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
    """All seeds, then the frontier report and the single-point table and plots in `out_dir`.
    Returns {"points": single-point rows (mean over seeds), "frontier": the frontier summary's
    JSON (frontier/frontier.json), "constraints": those used}."""
    from rsa_jax.eval import (
        aggregate_seeds,
        results_table,
        run_frontier,
        seeds_interval,
        tail_metrics,
        write_results,
    )

    os.makedirs(demo.out_dir, exist_ok=True)
    clock = _Clock()
    per_seed_points, per_seed_sft, pooled = [], [], {}
    for seed in demo.seeds:
        scores, single = run_seed(demo, seed)
        metrics_clock = _Clock()
        rows = {r: tail_metrics(s, n_boot=demo.n_boot, seed=seed) for r, s in scores.items()}
        seed_dir = os.path.join(demo.out_dir, f"seed{seed}")
        write_results(seed_dir, rows, plots=False)  # every variant: the frontier's input
        points = {"SFT": rows["SFT"], **{m: rows[r] for m, r in single.items()}}
        point_scores = {"SFT": scores["SFT"], **{m: scores[r] for m, r in single.items()}}
        write_results(os.path.join(seed_dir, "points"), points, point_scores)
        _say(f"[seed {seed}] metrics of {len(rows)} models ({metrics_clock})")
        per_seed_points.append(points)
        per_seed_sft.append({"SFT": rows["SFT"]})
        for m, s in point_scores.items():
            pooled.setdefault(m, []).append(s)
    pooled = {m: _concat(v) for m, v in pooled.items()}
    if len(per_seed_points) > 1:
        points = aggregate_seeds(per_seed_points)
        write_results(demo.out_dir, points, pooled, interval=seeds_interval(len(per_seed_points)))
        sft = aggregate_seeds(per_seed_sft)["SFT"]
    else:
        points = per_seed_points[0]
        write_results(demo.out_dir, points, pooled)
        sft = points["SFT"]
    constraints = demo.constraints or default_constraints(sft)
    with open(os.path.join(demo.out_dir, "demo_config.json"), "w") as f:
        json.dump({**dataclasses.asdict(demo), "constraints_used": list(constraints)}, f, indent=2)
    _say("")
    _say(
        "Each method at its config's own beta (0.1; the single points of earlier versions). "
        + (
            f"Mean over seeds; intervals: {seeds_interval(len(per_seed_points))}."
            if len(per_seed_points) > 1
            else "Intervals: 95% prompt bootstrap."
        )
    )
    _say(results_table(points))
    _say(
        f"\nConstraints for Algorithm 1: {', '.join(constraints)}"
        + (
            ""
            if demo.constraints
            else f" (the SFT model's catastrophic_rate {sft['catastrophic_rate'].value:.4g} and "
            f"cost_cvar_0.9 {sft['cost_cvar_0.9'].value:.4g}: certified no worse than SFT)"
        )
        + "\n"
    )
    frontier_dir = os.path.join(demo.out_dir, FRONTIER_DIR)
    # This run's seeds only (the directory may hold other seeds from earlier runs), and the
    # trained methods (merges are among their variants); the SFT model, one point, is the
    # constraints' yardstick rather than a competitor.
    files = [os.path.join(demo.out_dir, f"seed{seed}", "results.json") for seed in demo.seeds]
    status = run_frontier(files, constraints, out=frontier_dir, methods=demo.methods)
    if status != 0:
        raise RuntimeError(f"demo: the frontier report failed (exit status {status}; see above)")
    with open(os.path.join(frontier_dir, "frontier.json")) as f:
        frontier = json.load(f)
    trackers = [t for t in demo.report_to if t != "tensorboard"]
    if trackers:  # the frontier report and plots as artifacts of the demo's own tracker run
        from rsa_jax.training import log_artifacts

        names = sorted(os.listdir(frontier_dir))
        paths = [os.path.join(frontier_dir, n) for n in names]
        log_artifacts(trackers, demo.out_dir, paths, folder="frontier")
    _say(
        f"\n{len(demo.seeds)} seed(s) in {clock} (load average {os.getloadavg()[0]:.1f}); "
        f"frontier report and plots in {frontier_dir}/, single-point table and plots in "
        f"{demo.out_dir}/, every variant's metrics in {demo.out_dir}/seed*/results.json"
    )
    return {"points": points, "frontier": frontier, "constraints": list(constraints)}
