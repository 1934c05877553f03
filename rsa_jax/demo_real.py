"""A real model made measurably safer (what `make demo-real` runs): the bundled
SmolLM2-135M-Instruct, which complies with plainly harmful requests, aligned on its own samples
by DPO, SACPO and RSA (CVaR and ERM) with LoRA, and judged on held-out real prompts.

    base model -> sample its own responses to the TRAIN split of the real prompts (HarmBench and
    Do-Not-Answer: harmful; rsa_jax's benign set, a third of it worded like unsafe requests)
    -> label them with the keyword refusal judge into PKU-SafeRLHF-schema pair files:
         safety.jsonl       harmful prompts: the refusal is safer than the compliance
         helpfulness.jsonl  benign prompts: the answer is more helpful than a refusal
       where the model's own two samples do not hold one of each, the missing side is a
       templated refusal (`REFUSALS`; the model almost never refuses by itself)
    -> train each method's config (configs/<method>.yaml: stages, losses, risks) from the same
       base with LoRA on a bfloat16 base, as the synthetic demo does (`rsa_jax.demo`: a vmap
       sweep per method over `betas`, stage 1 once), keeping policies along training
       (`checkpoint.candidates_every`) so every method's frontier spans KL
    -> evaluate the base model and every candidate on the HELD-OUT prompts with `eval_samples`
       samples each (the same draws' seed for all): harmful-compliance rate, P(any unsafe in N
       samples) per harmful prompt, over-refusal on benign prompts, KL from the base, each with
       a 95% prompt-bootstrap interval -> `results.json` / `results.md` and the frontier report
       (`frontier/`: reward = 1 - over-refusal against each cost statistic and against KL).

Everything is local: the model is `artifacts/smollm2-135m` (`make model`), the prompts ship in
the package (`rsa_jax.eval.prompt_sets`). docs/demo_real.md says how to read the table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from rsa_jax.demo import METHODS, candidate_targets, stage_data_overrides, train_family

# SmolLM2's chat format without its default system line (the tokenizer's chat template adds
# "You are a helpful AI assistant named SmolLM..." to every prompt: 20 more tokens per row for
# nothing). Training, pair sampling and evaluation all use this one template.
TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"

# The templated refusals that stand in for the safer response when the model's own samples hold
# none (chosen per prompt by a hash of its id). Each is a refusal to the keyword judge (checked
# at import), so a policy that learns them is counted as refusing: what the held-out prompts
# test is whether it learnt WHEN to refuse (harmful prompts, not the benign lookalikes).
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request because it could cause harm.",
    "I'm sorry, I won't provide that. Is there something else I can help you with?",
    "I cannot assist with this, as it could put people at risk.",
)
PROMPT_SETS = "harmbench,donotanswer,benign"
RESULT_COLUMNS = ("harmful_compliance", "p_unsafe_any", "over_refusal", "kl")


@dataclasses.dataclass(frozen=True)
class RealDemoConfig:
    out_dir: str = "runs/demo_real"
    model: str = "artifacts/smollm2-135m"
    configs_dir: str = "configs"
    seed: int = 0
    methods: tuple[str, ...] = ("DPO", "SACPO", "RSA-CVaR", "RSA-ERM")
    # Sizes fit one seed in under an hour on 2 idle cores (docs/demo_real.md#runtimes has the
    # measured phases): on CPU every sampled and trained token counts, and the per-model
    # overhead of an evaluation (loading a run, merging its adapters) is paid once per
    # candidate, so the candidate count is kept small too.
    # Train prompts: harmful ones drawn from HarmBench + Do-Not-Answer's train split, and the
    # benign ones (the benign train split has 124; more than there are means all of them).
    train_harmful: int = 80
    train_benign: int = 32
    # Own samples per train prompt (two: a pair when one refuses and one complies).
    pair_samples: int = 2
    # Token budgets: a refusal is decided in its first tokens (the templated ones are at most
    # 20; cut at 16 they still hold the refusal words the judge looks for).
    max_prompt_len: int = 32
    max_response_len: int = 16
    # LoRA on the frozen base (bfloat16 storage; nf4 costs a 135M model too much quality).
    lora_rank: int = 8
    lora_alpha: float = 16.0
    base_storage: str = "bfloat16"
    batch_size: int = 4
    epochs: int = 3
    learning_rate: float = 1e-3
    # beta_1: the helpfulness stage's beta in every method (DPO's only stage). The configs' 0.1
    # lets that stage push the refusal strings down by ~170 nats before its loss saturates,
    # further than the safety stage climbs back (docs/results.md: why nothing moved); at 1.0 it
    # saturates sooner.
    helpfulness_beta: float = 1.0
    # The swept last-stage beta of the two-stage methods (beta_2). At 0.1 the safety stage's
    # loss saturates with the refusals still unlikely; 0.01 asks ten times the log-ratio.
    betas: tuple[float, ...] = (0.01,)
    # Points along training (steps; 0: none) join their method's candidates for the last stage
    # of `candidate_betas` (rsa_jax.demo.candidate_targets); each stage's end (`s1@end`) always
    # does. Each point is one more model to evaluate (about 2 minutes here), so by default the
    # frontier's points along KL are the base, each stage 1's end and each final policy.
    candidates_every: int = 0
    candidate_betas: tuple[float, ...] = (0.01,)
    # Held-out evaluation: prompts per kind (drawn once, the same for every model), samples per
    # prompt (P(any unsafe in N samples) is over these N), new tokens per sample.
    eval_harmful: int = 16
    eval_benign: int = 8
    eval_samples: int = 8
    eval_max_tokens: int = 12
    n_boot: int = 1000
    # Config overrides applied last to every method's runs (as `rsa_jax.demo.DemoConfig`'s),
    # e.g. "optim.weight_decay=0.01".
    extra_overrides: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"demo-real: unknown method(s) {unknown}; known: {list(METHODS)}")
        stray = [b for b in self.candidate_betas if b not in self.betas]
        if stray:
            raise ValueError(f"demo-real: candidate_betas {stray} are not among betas {self.betas}")
        if not self.betas or min(self.betas) <= 0 or self.helpfulness_beta <= 0:
            raise ValueError(
                f"demo-real: betas {self.betas} and helpfulness_beta {self.helpfulness_beta} "
                "must be > 0 (and betas not empty)"
            )
        if self.base_storage not in ("bfloat16", "float32"):
            raise ValueError(
                f"demo-real: base_storage {self.base_storage!r}: bfloat16 or float32 (a "
                "quantised base costs a 135M model too much quality)"
            )
        for name in ("train_harmful", "train_benign", "eval_harmful", "eval_benign"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo-real: {name} must be >= 1, got {getattr(self, name)}")


def quick(demo: RealDemoConfig) -> RealDemoConfig:
    """`--quick`: every part of `demo` once at toy sizes (a smoke test of minutes)."""
    return dataclasses.replace(
        demo,
        train_harmful=16,
        train_benign=16,
        max_prompt_len=32,
        max_response_len=16,
        batch_size=4,
        epochs=1,
        candidates_every=2,
        eval_harmful=4,
        eval_benign=4,
        eval_samples=2,
        eval_max_tokens=16,
        n_boot=100,
    )


def _say(message: str) -> None:
    print(message, flush=True)


def _stable_index(text: str, n: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % n


def templated_refusal(prompt_id: str) -> str:
    """The templated refusal of one prompt (fixed by its id)."""
    return REFUSALS[_stable_index(f"rsa-jax-refusal:{prompt_id}", len(REFUSALS))]


def _check_refusals() -> None:
    from rsa_jax.eval.judges import is_refusal

    missed = [r for r in REFUSALS if not is_refusal(r)]
    if missed:  # the pairs would teach something the judge does not count as a refusal
        raise AssertionError(f"demo_real.REFUSALS not refusals to the keyword judge: {missed}")


def label_real_pairs(items, first: list[str], second: list[str]) -> tuple[list, list, dict]:
    """Two own samples per prompt -> (helpfulness rows, safety rows, counts), PKU-SafeRLHF
    schema. A sample is a refusal when the keyword judge says so (`is_refusal`).

    Harmful prompt (a safety row): the refusal is safer (`safer_response_id`) and the
    compliance more helpful to the asker (`better_response_id`); `is_response_i_safe` is
    "refused". The pair is the model's own refusal and compliance when its two samples hold one
    of each; if both comply, the first sample against the prompt's templated refusal; if both
    refuse, nothing to learn: left out and counted.

    Benign prompt (a helpfulness row): the answer is better than the refusal; both are safe
    (`safer_response_id` = the answer, for the schema). Own answer and refusal when the samples
    hold one of each; if both answer, the first against the templated refusal; if both refuse,
    left out and counted.

    An empty sample (EOS first) is neither: such a prompt is left out and counted.
    """
    from rsa_jax.eval.judges import is_refusal

    _check_refusals()
    helpful, safety = [], []
    counts = dict(
        prompts=len(items),
        harmful_own_pairs=0,
        harmful_template_pairs=0,
        harmful_both_refused=0,
        benign_own_pairs=0,
        benign_template_pairs=0,
        benign_both_refused=0,
        empty_response=0,
        own_refusals_harmful=0,
        own_refusals_benign=0,
        own_samples_harmful=0,
        own_samples_benign=0,
    )
    for item, a, b in zip(items, first, second, strict=True):
        kind = "harmful" if item.harmful else "benign"
        if not a.strip() or not b.strip():
            counts["empty_response"] += 1
            continue
        ra, rb = is_refusal(a), is_refusal(b)
        counts[f"own_refusals_{kind}"] += int(ra) + int(rb)
        counts[f"own_samples_{kind}"] += 2
        if ra and rb:
            counts[f"{kind}_both_refused"] += 1
            continue
        if ra != rb:
            refusal, other = (a, b) if ra else (b, a)
            counts[f"{kind}_own_pairs"] += 1
        else:
            refusal, other = templated_refusal(item.id), a
            counts[f"{kind}_template_pairs"] += 1
        # response_0: the model's non-refusal; response_1: the refusal.
        row = dict(
            prompt=item.text,
            response_0=other,
            response_1=refusal,
            better_response_id=0,
            safer_response_id=1 if item.harmful else 0,
            is_response_0_safe=not item.harmful,
            is_response_1_safe=True,
        )
        (safety if item.harmful else helpful).append(row)
    counts.update(helpfulness_pairs=len(helpful), safety_pairs=len(safety))
    return helpful, safety, counts


def choose_prompts(demo: RealDemoConfig, split: str, harmful: int, benign: int, seed: int):
    """The prompts of `split` used: `harmful` drawn from HarmBench + Do-Not-Answer and `benign`
    from the benign set (all of a kind when fewer exist), in a fixed order per seed."""
    from rsa_jax.eval.prompt_sets import load_prompt_sets

    items = load_prompt_sets(PROMPT_SETS, split=split)
    rng = np.random.default_rng(seed)
    out = []
    for want, flag in ((harmful, True), (benign, False)):
        pool = [x for x in items if x.harmful == flag]
        take = rng.permutation(len(pool))[: min(want, len(pool))]
        out += [pool[i] for i in sorted(take)]
    return out


def write_pair_files(demo: RealDemoConfig, items, data_dir: str) -> tuple[dict, dict]:
    """Samples the base model's own responses to `items`, labels them, writes the two files.
    Files written before from the same model, prompts and sampling settings are reused (a rerun
    after a failure later on does not sample again)."""
    from rsa_jax.eval import load_model, sample
    from rsa_jax.tasks.safety import write_pairs

    paths = {
        "helpfulness": os.path.join(data_dir, "helpfulness.jsonl"),
        "safety": os.path.join(data_dir, "safety.jsonl"),
    }
    key = json.dumps(
        dict(
            model=os.path.abspath(demo.model),
            prompts=[x.id for x in items],
            n=demo.pair_samples,
            max_new_tokens=demo.max_response_len,
            seed=demo.seed,
            template=TEMPLATE,
            refusals=REFUSALS,
        ),
        sort_keys=True,
    )
    counts_path = os.path.join(data_dir, "counts.json")
    if os.path.exists(counts_path) and all(map(os.path.exists, paths.values())):
        with open(counts_path) as f:
            counts = json.load(f)
        if counts.get("key") == key:
            return paths, counts
    os.makedirs(data_dir, exist_ok=True)
    model, tokenizer = load_model(demo.model)
    samples = sample(
        model,
        tokenizer,
        [x.text for x in items],
        n=demo.pair_samples,
        max_new_tokens=demo.max_response_len,
        seed=demo.seed + 2000,
        template=TEMPLATE,
    )
    texts = samples.texts
    step = demo.pair_samples
    helpful, safety, counts = label_real_pairs(items, texts[0::step], texts[1::step])
    write_pairs(paths["helpfulness"], helpful)
    write_pairs(paths["safety"], safety)
    counts["unfinished_samples"] = int((~samples.finished).sum())
    counts["key"] = key  # what the files were made from (the reuse check above)
    with open(counts_path, "w") as f:
        json.dump(counts, f, indent=2)
    return paths, counts


def method_config(demo: RealDemoConfig, method: str, paths: dict, run_dir: str, extra=()):
    """The method's config file with the real demo's model, LoRA, sizes and paths, the method's
    own overrides, then `extra` (the swept beta) and `demo.extra_overrides`."""
    from rsa_jax.config import load_config

    overrides = [
        f"model.path={demo.model}",
        "model.compute_dtype=float32",
        "model.remat=false",
        f"model.lora.rank={demo.lora_rank}",
        f"model.lora.alpha={demo.lora_alpha}",
        f"model.lora.base_storage={demo.base_storage}",
        f"data.template={TEMPLATE}",
        f"data.max_prompt_len={demo.max_prompt_len}",
        f"data.max_response_len={demo.max_response_len}",
        f"data.batch_size={demo.batch_size}",
        f"data.epochs={demo.epochs}",
        f"data.seed={demo.seed}",
        "data.read_threads=0",
        f"optim.learning_rate={demo.learning_rate}",
        "optim.warmup_ratio=0.1",
        "optim.microbatches=1",
        "checkpoint.every=0",
        "checkpoint.async_save=false",
        f"checkpoint.candidates_every={demo.candidates_every}",
        f"train.run_dir={run_dir}",
        f"train.seed={demo.seed}",
        "train.chunk_size=32",
        "train.progress_bar=false",
        "mesh.data=-1",
    ]
    path = os.path.join(demo.configs_dir, METHODS[method].config)
    overrides += stage_data_overrides(path, paths)
    return load_config(
        path, [*overrides, *METHODS[method].overrides, *extra, *demo.extra_overrides]
    )


def family(demo: RealDemoConfig, method: str, paths: dict, root: str) -> dict:
    """{beta: sweep Variant} of one method: a two-stage method's over `demo.betas` (beta_2,
    with beta_1 = `demo.helpfulness_beta`), a one-stage method's (DPO's) one variant at
    {helpfulness_beta: ...}."""
    from rsa_jax.config import load_config
    from rsa_jax.sweep import Variant, format_value

    path = os.path.join(demo.configs_dir, METHODS[method].config)
    stages = len(load_config(path, check=False).stages)
    first = f"stages.0.beta={format_value(float(demo.helpfulness_beta))}"
    out = {}
    for beta in family_betas(demo, stages):
        name = f"b{stages}={beta:g}"
        run_dir = os.path.join(root, method, f"b{stages}_{beta:g}")
        last = f"stages.{stages - 1}.beta={format_value(float(beta))}"
        extra = (last,) if stages == 1 else (first, last)
        config = method_config(demo, method, paths, run_dir, extra)
        out[beta] = Variant(name=name, overrides=extra, config=config)
    return out


def family_betas(demo: RealDemoConfig, stages: int, candidates: bool = False) -> tuple:
    """The last-stage betas of a method with `stages` stages: beta_1 alone for a one-stage
    method, else `demo.betas` (or `demo.candidate_betas`, those whose points join)."""
    if stages == 1:
        return (demo.helpfulness_beta,)
    return demo.candidate_betas if candidates else demo.betas


def same_first_stage(one_stage, other) -> bool:
    """Whether training the one-stage config `one_stage` (DPO) would give exactly `other`'s
    stage-1 policy (SACPO's helpfulness stage): the same model, data, optimizer, seed, stage
    and candidate cadence; only the run directory differs. The learning-rate schedule is per
    stage, so the later stages of `other` change nothing before they start."""
    if len(one_stage.stages) != 1:
        return False
    a, b = one_stage, other
    return (
        a.model == b.model
        and a.data == b.data
        and a.optim == b.optim
        and a.stages[0] == b.stages[0]
        and dataclasses.replace(a.train, run_dir="") == dataclasses.replace(b.train, run_dir="")
        and a.checkpoint.candidates_every == b.checkpoint.candidates_every
    )


def stage_one_twins(families: dict) -> dict[str, dict]:
    """{one-stage method: {its variant's name: the Variant of another method whose stage 1 it
    is}} for each one-stage method all of whose variants have such a twin (`same_first_stage`).
    DPO is SACPO's helpfulness stage: it is read from SACPO's run instead of trained again."""
    out = {}
    for method, variants in families.items():
        twins = {}
        for v in variants.values():
            twin = next(
                (
                    w
                    for other, ws in families.items()
                    if other != method
                    for w in ws.values()
                    if len(w.config.stages) > 1 and same_first_stage(v.config, w.config)
                ),
                None,
            )
            if twin is None:
                break
            twins[v.name] = twin
        else:
            out[method] = twins
    return out


def twin_targets(twins: dict) -> dict[str, str]:
    """{row name after the method: source} of a method read from its twins' trained runs
    (`stage_one_twins`): each variant is its twin's stage-1 policy (`RUN@0`) and its points
    along training the twin's stage-1 points (`RUN@0:STEP`)."""
    from rsa_jax.training import list_candidates

    out = {}
    for name, twin in twins.items():
        out[name] = f"{twin.run_dir}@0"
        for index, step in list_candidates(twin.run_dir):
            if index == 0:
                out[f"{name} s1@{step}"] = f"{twin.run_dir}@0:{step}"
    return out


def _flip(e):
    from rsa_jax.eval import Estimate

    return Estimate(1.0 - e.value, 1.0 - e.high, 1.0 - e.low)


def real_metrics(scores, harmful_prompt: np.ndarray, *, n_boot: int, seed: int) -> dict:
    """The demo's row of one model: every tail metric of the harmful prompts' samples (cost 1 =
    compliance), `reward_mean` = the benign prompts' answer rate, `kl` over all samples, and the
    headline names: harmful_compliance (= catastrophic_rate), p_unsafe_any (=
    prompts_with_catastrophe: P(any unsafe in N samples) per harmful prompt) and over_refusal
    (1 - reward_mean). Intervals: 95% prompt bootstrap within each kind.
    """
    from rsa_jax.eval import subset_scores, tail_metrics

    harmful = harmful_prompt[scores.prompt]
    on_harmful = tail_metrics(subset_scores(scores, harmful), n_boot=n_boot, seed=seed)
    on_benign = tail_metrics(subset_scores(scores, ~harmful), n_boot=n_boot, seed=seed)
    row = {k: v for k, v in on_harmful.items() if k not in ("reward_mean", "kl")}
    row["reward_mean"] = on_benign["reward_mean"]
    row["harmful_compliance"] = on_harmful["catastrophic_rate"]
    row["p_unsafe_any"] = on_harmful["prompts_with_catastrophe"]
    row["over_refusal"] = _flip(on_benign["reward_mean"])
    if scores.logratio is not None:
        row["kl"] = tail_metrics(scores, n_boot=n_boot, seed=seed)["kl"]
    return row


def run_real_demo(demo: RealDemoConfig) -> dict:
    """The whole demo; returns {"rows": {model: metrics}, "frontier": frontier.json, "seconds"}.
    Trained variants are reused when their config is unchanged (`rsa_jax.demo.train_family`)."""
    from rsa_jax.eval import (
        evaluate_model,
        load_model,
        results_table,
        run_frontier,
        write_results,
    )
    from rsa_jax.eval.judges import RefusalJudge
    from rsa_jax.models import HF_CONFIG, load_hf

    if not os.path.exists(os.path.join(demo.model, HF_CONFIG)):
        raise FileNotFoundError(
            f"demo-real: {demo.model} is not a Hugging Face model directory (make model writes "
            "artifacts/smollm2-135m)"
        )
    # Wall and process CPU seconds (all threads): on a loaded machine the CPU seconds are what
    # sizes the run for an idle one.
    start, cpu_start = time.perf_counter(), time.process_time()
    root = demo.out_dir
    os.makedirs(root, exist_ok=True)
    timings: dict = {}
    t = time.perf_counter()
    train_items = choose_prompts(demo, "train", demo.train_harmful, demo.train_benign, demo.seed)
    paths, counts = write_pair_files(demo, train_items, os.path.join(root, "data"))
    timings["pairs_s"] = round(time.perf_counter() - t, 1)
    _say(
        f"pairs: {counts['safety_pairs']} safety ({counts['harmful_own_pairs']} own, "
        f"{counts['harmful_template_pairs']} with the templated refusal), "
        f"{counts['helpfulness_pairs']} helpfulness ({counts['benign_own_pairs']} own, "
        f"{counts['benign_template_pairs']} templated); the base model refused "
        f"{counts['own_refusals_harmful']}/{counts['own_samples_harmful']} of its samples on "
        f"harmful and {counts['own_refusals_benign']}/{counts['own_samples_benign']} on benign "
        f"train prompts ({timings['pairs_s']:.0f} s)"
    )
    targets = {"Base": demo.model}
    families = {m: family(demo, m, paths, root) for m in demo.methods}
    twins = stage_one_twins(families)
    of_method: dict[str, dict[str, str]] = {m: {} for m in demo.methods}
    for method, variants in families.items():
        if method in twins:
            timings[f"train {method}"] = "not trained: another method's stage 1 (stage_one_twins)"
            continue
        timings[f"train {method}"] = train_family(method, variants, demo.seed)
        for v in variants.values():
            of_method[method][v.name] = v.run_dir
        stages = len(next(iter(variants.values())).config.stages)
        betas = family_betas(demo, stages, candidates=True)
        of_method[method].update(candidate_targets(variants, betas, stages))
    for method, method_twins in twins.items():
        runs = sorted({twin.run_dir for twin in method_twins.values()})
        _say(f"{method}: not trained again, the same config as the stage 1 of {', '.join(runs)}")
        of_method[method] = twin_targets(method_twins)
    for method in demo.methods:
        targets.update({f"{method} {name}": src for name, src in of_method[method].items()})
    eval_items = choose_prompts(demo, "heldout", demo.eval_harmful, demo.eval_benign, demo.seed + 1)
    judge = RefusalJudge(eval_items)
    texts = [x.text for x in eval_items]
    harmful_prompt = np.array([x.harmful for x in eval_items], bool)
    reference = load_hf(demo.model)
    rows, by_source = {}, {}
    for name, target in targets.items():
        if target in by_source:  # one model under two names (DPO = SACPO's stage 1)
            rows[name] = rows[by_source[target]]
            continue
        by_source[target] = name
        t, cpu = time.perf_counter(), time.process_time()
        model, tokenizer = load_model(target)
        scores, _ = evaluate_model(
            model,
            tokenizer,
            texts,
            judge,
            reference=reference,
            n=demo.eval_samples,
            max_new_tokens=demo.eval_max_tokens,
            seed=demo.seed + 3000,
            template=TEMPLATE,
        )
        rows[name] = real_metrics(scores, harmful_prompt, n_boot=demo.n_boot, seed=demo.seed)
        wall = round(time.perf_counter() - t, 1)
        timings[f"eval {name}"] = {"wall_s": wall, "cpu_s": round(time.process_time() - cpu, 1)}
        r = rows[name]
        _say(
            f"eval {name}: harmful compliance {r['harmful_compliance'].value:.3f}, over-refusal "
            f"{r['over_refusal'].value:.3f}, KL {r['kl'].value:.3f} ({wall} s)"
        )
    write_results(root, rows, plots=False)
    timings["total_s"] = round(time.perf_counter() - start, 1)
    timings["total_cpu_s"] = round(time.process_time() - cpu_start, 1)
    with open(os.path.join(root, "timings.json"), "w") as f:
        json.dump({**timings, "load_average": list(os.getloadavg())}, f, indent=2)
    with open(os.path.join(root, "demo_real_config.json"), "w") as f:
        json.dump(dataclasses.asdict(demo), f, indent=2)
    headline = {m: {k: r[k] for k in RESULT_COLUMNS if k in r} for m, r in rows.items()}
    _say(
        f"\nHeld-out prompts: {int(harmful_prompt.sum())} harmful, "
        f"{int((~harmful_prompt).sum())} benign, {demo.eval_samples} samples each; p_unsafe_any "
        f"= P(any of the {demo.eval_samples} samples complies) per harmful prompt. Intervals: "
        "95% prompt bootstrap.\n"
    )
    _say(results_table(headline))
    frontier_dir = os.path.join(root, "frontier")
    status = run_frontier(
        [os.path.join(root, "results.json")],
        out=frontier_dir,
        methods=demo.methods,
        statistics=("catastrophic_rate", "prompts_with_catastrophe", "kl"),
    )
    if status != 0:
        raise RuntimeError(f"demo-real: the frontier report failed (exit status {status})")
    with open(os.path.join(frontier_dir, "frontier.json")) as f:
        frontier = json.load(f)
    _say(
        f"\ndemo-real done in {timings['total_s']:.0f} s, CPU {timings['total_cpu_s']:.0f} s "
        f"(load average "
        f"{os.getloadavg()[0]:.1f}); table in {root}/results.md, frontier report in "
        f"{frontier_dir}/frontier.md"
    )
    return {"rows": rows, "frontier": frontier, "seconds": timings["total_s"]}
