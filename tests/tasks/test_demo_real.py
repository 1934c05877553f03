"""`rsa-jax demo-real`: how its preference pairs are made from the model's own samples (a hand-made
table: own pairs, templated refusals, left-out prompts), the prompts it draws, the metrics of its
table, and (slow) the whole pipeline at --quick sizes on the bundled SmolLM2-135M."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rsa_jax.data import DataConfig, load_pairs
from rsa_jax.demo_real import (
    REFUSALS,
    RealDemoConfig,
    choose_prompts,
    family,
    label_real_pairs,
    method_config,
    real_metrics,
    same_first_stage,
    stage_one_twins,
    templated_refusal,
)
from rsa_jax.eval import SampleScores
from rsa_jax.eval.judges import is_refusal
from rsa_jax.eval.prompt_sets import PromptItem, load_prompt_set
from rsa_jax.tasks.safety import write_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "artifacts", "smollm2-135m")

COMPLY = "Sure, first you need to mix the two chemicals."
ANSWER = "Run `kill -9 PID` to stop the process."
OWN_REFUSAL = "I'm sorry, I cannot help with that request."


def _item(i, harmful):
    kind = "h" if harmful else "b"
    return PromptItem(f"{kind}-{i}", f"prompt {kind}{i}", "c", "test", harmful)


def test_pairs_prefer_the_refusal_on_harmful_and_the_answer_on_benign_prompts():
    items = [_item(0, True), _item(1, True), _item(2, True), _item(3, False), _item(4, False)]
    items += [_item(5, False), _item(6, True)]
    first = [COMPLY, OWN_REFUSAL, OWN_REFUSAL, ANSWER, OWN_REFUSAL, OWN_REFUSAL, ""]
    second = [COMPLY + " Then heat it.", COMPLY, OWN_REFUSAL, ANSWER, ANSWER, OWN_REFUSAL, COMPLY]
    helpful, safety, counts = label_real_pairs(items, first, second)
    # harmful 0: both comply -> the first against the templated refusal; harmful 1: own pair;
    # harmful 2: both refuse -> left out; harmful 6: an empty sample -> left out.
    assert [r["prompt"] for r in safety] == ["prompt h0", "prompt h1"]
    assert safety[0]["response_0"] == COMPLY
    assert safety[0]["response_1"] == templated_refusal("h-0")
    assert safety[1]["response_0"] == COMPLY and safety[1]["response_1"] == OWN_REFUSAL
    for row in safety:
        assert row["safer_response_id"] == 1 and row["better_response_id"] == 0
        assert row["is_response_1_safe"] and not row["is_response_0_safe"]
    # benign 3: both answer -> against the templated refusal; 4: own pair; 5: both refuse.
    assert [r["prompt"] for r in helpful] == ["prompt b3", "prompt b4"]
    assert helpful[0]["response_1"] == templated_refusal("b-3")
    assert helpful[1]["response_0"] == ANSWER and helpful[1]["response_1"] == OWN_REFUSAL
    for row in helpful:
        assert row["better_response_id"] == 0 and row["is_response_0_safe"]
    assert counts == dict(
        prompts=7,
        harmful_own_pairs=1,
        harmful_template_pairs=1,
        harmful_both_refused=1,
        benign_own_pairs=1,
        benign_template_pairs=1,
        benign_both_refused=1,
        empty_response=1,
        own_refusals_harmful=3,
        own_refusals_benign=3,
        own_samples_harmful=6,
        own_samples_benign=6,
        helpfulness_pairs=2,
        safety_pairs=2,
    )


def test_the_pair_files_read_back_through_both_views(tmp_path):
    items = [_item(0, True), _item(1, False)]
    helpful, safety, _ = label_real_pairs(items, [COMPLY, ANSWER], [COMPLY, ANSWER])
    write_pairs(str(tmp_path / "h.jsonl"), helpful)
    write_pairs(str(tmp_path / "s.jsonl"), safety)
    (h,), _ = load_pairs(DataConfig(path=str(tmp_path / "h.jsonl"), view="helpfulness"))
    (s,), _ = load_pairs(DataConfig(path=str(tmp_path / "s.jsonl"), view="safety"))
    assert (h.chosen, h.rejected) == (ANSWER, templated_refusal("b-1"))
    assert (s.chosen, s.rejected) == (templated_refusal("h-0"), COMPLY)


def test_every_templated_refusal_is_a_refusal_to_the_judge_and_each_is_used():
    assert all(is_refusal(r) for r in REFUSALS)
    used = {templated_refusal(x.id) for x in load_prompt_set("harmbench", "train")}
    assert used == set(REFUSALS)


def test_prompts_come_from_one_split_and_are_the_same_each_time():
    demo = RealDemoConfig()
    train = choose_prompts(demo, "train", 30, 10, seed=0)
    held = choose_prompts(demo, "heldout", 30, 10, seed=1)
    assert sum(x.harmful for x in train) == 30 and sum(not x.harmful for x in train) == 10
    assert not {x.id for x in train} & {x.id for x in held}
    assert [x.id for x in choose_prompts(demo, "train", 30, 10, seed=0)] == [x.id for x in train]
    everything = choose_prompts(demo, "train", 10_000, 10_000, seed=0)
    assert len(everything) == len(load_prompt_set("harmbench", "train")) + len(
        load_prompt_set("donotanswer", "train")
    ) + len(load_prompt_set("benign", "train"))


def test_metrics_split_harmful_compliance_from_over_refusal():
    # prompts 0, 1 harmful (2 samples each), 2, 3 benign; cost 1 = compliance, reward 0 = refusal
    prompt = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    cost = np.array([1, 0, 0, 0, 0, 0, 0, 0], np.float64)
    reward = np.array([0, 0, 0, 0, 1, 0, 1, 1], np.float64)
    scores = SampleScores(prompt, reward, cost, cost >= 1, np.full(8, 0.5))
    row = real_metrics(scores, np.array([True, True, False, False]), n_boot=50, seed=0)
    assert row["harmful_compliance"].value == pytest.approx(0.25)  # 1 of 4 harmful samples
    assert row["p_unsafe_any"].value == pytest.approx(0.5)  # 1 of 2 harmful prompts
    assert row["over_refusal"].value == pytest.approx(0.25)  # 1 of 4 benign samples
    assert row["reward_mean"].value == pytest.approx(0.75)
    assert row["kl"].value == pytest.approx(0.5)
    low, high = row["over_refusal"].low, row["over_refusal"].high
    assert 0.0 <= low <= 0.25 <= high <= 0.5


def test_config_rejects_a_quantised_base_and_stray_betas():
    with pytest.raises(ValueError, match="base_storage 'nf4'"):
        RealDemoConfig(base_storage="nf4")
    with pytest.raises(ValueError, match="candidate_betas"):
        RealDemoConfig(betas=(0.1,), candidate_betas=(0.05,))
    with pytest.raises(ValueError, match="helpfulness_beta 0"):
        RealDemoConfig(helpfulness_beta=0)


PATHS = {"helpfulness": "/data/helpfulness.jsonl", "safety": "/data/safety.jsonl"}


def test_each_stage_reads_the_pair_file_of_its_view():
    """Regression: a stage without its own `view` (the first stage of every method config) reads
    data.view ("auto": the helpfulness file); it used to look up a missing key None."""
    demo = RealDemoConfig(configs_dir=os.path.join(ROOT, "configs"))
    for method in demo.methods:
        config = method_config(demo, method, PATHS, "/runs/x")
        got = [stage.data_path for stage in config.stages]
        want = [PATHS["helpfulness"], PATHS["safety"]][: len(config.stages)]
        assert got == want, method
    # extra_overrides come last, over the method's own values.
    demo = RealDemoConfig(
        configs_dir=os.path.join(ROOT, "configs"), extra_overrides=("stages.0.beta=1.0",)
    )
    assert method_config(demo, "SACPO", PATHS, "/runs/x").stages[0].beta == 1.0


def test_dpo_is_read_from_sacpos_first_stage_only_when_the_configs_agree():
    demo = RealDemoConfig(configs_dir=os.path.join(ROOT, "configs"))
    families = {m: family(demo, m, PATHS, "/runs") for m in demo.methods}
    # beta_1 in every method's first stage (DPO's only one), beta_2 in the last
    assert set(families["DPO"]) == {demo.helpfulness_beta}
    for method in ("SACPO", "RSA-CVaR", "RSA-ERM"):
        (variant,) = families[method].values()
        assert [s.beta for s in variant.config.stages] == [demo.helpfulness_beta, *demo.betas]
    twins = stage_one_twins(families)
    assert set(twins) == {"DPO"}
    ((name, twin),) = twins["DPO"].items()
    assert name == "b1=1" and twin.run_dir == families["SACPO"][0.01].run_dir
    dpo, sacpo = families["DPO"][1.0].config, families["SACPO"][0.01].config
    assert same_first_stage(dpo, sacpo)
    # RSA's first stage has its own risk: not DPO's
    assert not same_first_stage(dpo, families["RSA-CVaR"][0.01].config)
    # another beta_1 (for DPO alone), learning rate or seed: DPO is trained on its own
    dirs = demo.configs_dir
    for dpo_demo in (
        RealDemoConfig(configs_dir=dirs, helpfulness_beta=0.5),
        RealDemoConfig(configs_dir=dirs, seed=1),
        RealDemoConfig(configs_dir=dirs, learning_rate=0.01),
    ):
        fam = {"DPO": family(dpo_demo, "DPO", PATHS, "/runs"), "SACPO": families["SACPO"]}
        assert stage_one_twins(fam) == {}
    # beta_2 is not part of stage 1: another beta_2 keeps the twin
    other = RealDemoConfig(configs_dir=dirs, betas=(0.05,), candidate_betas=(0.05,))
    fam = {"DPO": families["DPO"], "SACPO": family(other, "SACPO", PATHS, "/runs")}
    assert set(stage_one_twins(fam)) == {"DPO"}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MODEL), reason="make model writes artifacts/smollm2-135m")
def test_quick_demo_real_end_to_end(tmp_path):
    """`rsa-jax demo-real --quick` on the bundled model: pairs, every method trained with LoRA,
    every model judged on held-out prompts, the table and the frontier report written."""
    from rsa_jax.cli import main

    out = str(tmp_path / "demo_real")
    assert (
        main(
            [
                "demo-real",
                "--quick",
                "--out",
                out,
                "--model",
                MODEL,
                "--configs",
                os.path.join(ROOT, "configs"),
            ]
        )
        == 0
    )
    with open(os.path.join(out, "data", "counts.json")) as f:
        counts = json.load(f)
    assert counts["safety_pairs"] + counts["harmful_both_refused"] + counts["empty_response"] > 0
    with open(os.path.join(out, "results.json")) as f:
        methods = json.load(f)["methods"]
    assert "Base" in methods
    for m in RealDemoConfig().methods:
        assert any(row.startswith(f"{m} ") for row in methods), m
    for row, metrics in methods.items():
        for name in ("harmful_compliance", "p_unsafe_any", "over_refusal", "kl"):
            e = metrics[name]
            assert e["low"] <= e["value"] <= e["high"], (row, name, e)
    assert methods["Base"]["kl"]["value"] == 0.0
    assert any("@" in row for row in methods)  # points along training joined
    assert os.path.exists(os.path.join(out, "frontier", "frontier.md"))
