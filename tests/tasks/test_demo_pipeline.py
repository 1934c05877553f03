"""The demo pipeline end to end at toy sizes (SFT -> pairs -> each method's family of variants,
trained as vmap sweeps, and RSA(P) merges -> eval -> per-seed results the frontier reader accepts,
the frontier report with constrained optima, the single-point table and plots), its reuse of
finished runs, the constraints it derives from the SFT model, the CLI's --quick settings, and
`rsa-jax eval` on the directories it wrote."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from rsa_jax import demo as demo_module
from rsa_jax.cli import main
from rsa_jax.demo import DemoConfig, default_constraints, run_demo
from rsa_jax.eval import Estimate, load_frontier_inputs, read_results
from rsa_jax.training import list_candidates, load_source

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tests on the `demo` fixture (the whole demo at toy sizes, about 3-4 min on 2 cores) are
# slow; the default suite keeps the demo's settings and its parts (tests/tasks/test_safety.py,
# tests/sweep/, tests/eval/).


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(
        out_dir=str(out),
        configs_dir=os.path.join(ROOT, "configs"),
        seeds=(0,),
        methods=("DPO", "RSA-CVaR"),
        sft_steps=40,
        pair_prompts=256,
        batch_size=16,
        epochs=1,
        betas=(0.1, 0.01),
        merge_betas=(0.01,),
        merge_qs=(0.5,),
        eval_samples=4,
        eval_max_tokens=12,
        n_boot=50,
        candidates_every=4,
        candidate_betas=(0.01,),
    )
    result = run_demo(config)
    return config, result


@pytest.mark.slow  # the demo fixture
def test_every_variant_is_a_frontier_row_and_the_report_has_the_constrained_optima(demo):
    config, result = demo
    out = config.out_dir
    loaded = load_frontier_inputs([out])
    assert loaded.files == [os.path.join(out, "seed0", "results.json")]
    seed = os.path.join(out, "seed0")
    # Points along training (every 4 steps) of beta 0.01's runs: stage 1 once, stage 2 per beta.
    dpo_points = list_candidates(os.path.join(seed, "DPO", "b1_0.01"))
    rsa_points = list_candidates(os.path.join(seed, "RSA-CVaR", "b2_0.01"))
    assert dpo_points and {i for i, _ in rsa_points} == {0, 1}
    assert all(s % 4 == 0 for _, s in dpo_points + rsa_points)
    assert {m: sorted(v) for m, v in loaded.seeds["0"].items()} == {
        "SFT": ["SFT"],
        "DPO": sorted(["b1=0.01", "b1=0.1", *(f"b1=0.01 s1@{s}" for _, s in dpo_points)]),
        "RSA-CVaR": sorted(
            ["(P) b2=0.01 q=0.5", "b2=0.01", "b2=0.1", "s1@end"]  # merges: candidates too
            + [f"s1@{s}" if i == 0 else f"b2=0.01 s2@{s}" for i, s in rsa_points]
        ),
    }
    for variants in loaded.seeds["0"].values():
        for metrics in variants.values():
            for name in ("reward_mean", "catastrophic_rate", "cost_cvar_0.99", "kl"):
                est = metrics[name]
                assert est.low <= est.value <= est.high, (name, est)
    # The report: frontiers of the two compared methods (not the SFT yardstick) and each
    # constraint's choice for every method, from the SFT model's own numbers.
    frontier = result["frontier"]
    sft = read_results(os.path.join(out, "seed0", "points"))["SFT"]
    assert result["constraints"] == list(default_constraints(sft))
    assert set(frontier["choices"]) == set(result["constraints"])
    for choices in frontier["choices"].values():
        assert set(choices) == {"DPO", "RSA-CVaR"}
    assert set(frontier["frontiers"]["kl"]) == {"DPO", "RSA-CVaR"}
    assert [g["a"] + " - " + g["b"] for g in frontier["gaps"]][:1] == ["DPO - RSA-CVaR"]
    with open(os.path.join(out, "frontier", "frontier.md")) as f:
        report = f.read()
    assert report.count("## Constrained optimum") == 2
    for statistic in frontier["statistics"]:
        assert os.path.getsize(os.path.join(out, "frontier", f"frontier_{statistic}.png")) > 1000


@pytest.mark.slow  # the demo fixture
def test_single_points_keep_the_old_table_and_plots(demo):
    config, result = demo
    out = config.out_dir
    written = read_results(out)
    assert set(written) == {"SFT", "DPO", "RSA-CVaR"}  # each method at its config's beta 0.1
    every = read_results(os.path.join(out, "seed0"))
    assert written["RSA-CVaR"] == every["RSA-CVaR b2=0.1"]
    assert written["SFT"]["kl"].value == 0.0  # the SFT model is the reference
    assert written["RSA-CVaR"]["kl"].value != 0.0
    for png in ("reward_cost.png", "cost_tail.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
        assert os.path.getsize(os.path.join(out, "seed0", "points", png)) > 1000
        assert not os.path.exists(os.path.join(out, "seed0", png))  # every variant: no plot
    with open(os.path.join(out, "seed0", "data", "counts.json")) as f:
        counts = json.load(f)
    assert counts["pairs"] == 256
    assert (
        counts["helpfulness_pairs"] + counts["helpfulness_ties"] + counts["empty_response"] == 256
    )
    with open(os.path.join(out, "seed0", "timings.json")) as f:
        timings = json.load(f)
    for part in ("sft", "pairs", "train DPO", "merge RSA-CVaR", "eval RSA-CVaR (P) b2=0.01 q=0.5"):
        assert timings[part]["wall_s"] >= 0 and timings[part]["cpu_s"] >= 0, part


@pytest.mark.slow  # the demo fixture
def test_variants_share_stage_one_and_merges_average_it_with_the_final_policy(demo):
    config, _ = demo
    seed = os.path.join(config.out_dir, "seed0")
    runs = [os.path.join(seed, "RSA-CVaR", f"b2_{b:g}") for b in config.betas]
    for run in runs:  # both stages ran, in each variant's own run directory
        with open(os.path.join(run, "metrics.jsonl")) as f:
            assert {json.loads(line)["stage"] for line in f} == {0, 1}
    first = [load_source(f"{run}@0").params for run in runs]
    finals = [load_source(run).params for run in runs]
    for k in first[0]:  # stage 1 trained once: the same policy in every variant
        np.testing.assert_array_equal(np.asarray(first[1][k]), np.asarray(first[0][k]))
    assert any(not np.array_equal(finals[0][k], finals[1][k]) for k in finals[0])  # beta_2
    merged = load_source(os.path.join(seed, "merges", "RSA-CVaR_b2_0.01_q_0.5")).params
    for k in merged:  # theta_P = (1 - q) theta_1 + q theta_2, theta_2 from beta_2 = 0.01
        expected = 0.5 * np.asarray(first[1][k]) + 0.5 * np.asarray(finals[1][k])
        np.testing.assert_allclose(np.asarray(merged[k]), expected, rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow  # the demo fixture
def test_rerun_reuses_finished_runs_and_restarts_changed_ones(demo, capsys):
    config, _ = demo
    capsys.readouterr()
    changed = dataclasses.replace(
        config, methods=("RSA-CVaR",), betas=(0.1,), merge_betas=(), candidate_betas=()
    )
    run_demo(changed)
    printed = capsys.readouterr().out
    assert "RSA-CVaR: 0 variant(s) trained, 1 kept" in printed  # the same settings: reused
    assert "made with other settings" not in printed
    run_demo(dataclasses.replace(changed, learning_rate=config.learning_rate / 2))
    printed = capsys.readouterr().out
    assert "b2_0.1: made with other settings" in printed
    assert "RSA-CVaR: 1 variant(s) trained, 0 kept" in printed
    assert "sft: made with other settings" not in printed  # the SFT model was reused


def test_default_constraints_are_the_sft_models_own_tail():
    sft = {
        "catastrophic_rate": Estimate(0.01742, 0.0135, 0.0215),
        "cost_cvar_0.9": Estimate(3.254, 2.84, 3.67),
    }
    assert default_constraints(sft) == ("catastrophic_rate<=0.017", "cost_cvar_0.9<=3.3")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("methods", ("DPO", "PPO"), "unknown method(s) ['PPO']"),
        ("merge_betas", (0.3,), "merge_betas [0.3] are not among betas"),
        ("merge_qs", (1.0,), "strictly between 0 and 1"),
        ("betas", (), "betas is empty"),
        ("candidate_betas", (0.3,), "candidate_betas [0.3] are not among betas"),
        ("candidates_every", -1, "candidates_every -1 must be >= 0"),
    ],
)
def test_bad_demo_settings_fail_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match="demo: ") as info:
        DemoConfig(**{field: value})
    assert words in str(info.value)


def test_cli_demo_defaults_to_one_seed_and_quick_is_a_small_frontier(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo_module, "run_demo", seen.append)
    configs = os.path.join(ROOT, "configs")
    assert main(["demo", "--out", str(tmp_path), "--configs", configs]) == 0
    assert seen[-1].seeds == (0,) and seen[-1] == DemoConfig(
        out_dir=str(tmp_path), configs_dir=configs
    )
    argv = ["demo", "--quick", "--seeds", "0", "1", "2", "--constraint", "kl<=2", "--configs"]
    assert main([*argv, configs]) == 0
    quick = seen[-1]
    assert quick.seeds == (0, 1, 2) and quick.constraints == ("kl<=2",)
    assert len(quick.betas) >= 2 and quick.merge_betas and quick.merge_qs  # still a frontier
    assert quick.sft_steps < DemoConfig.sft_steps and quick.eval_samples < DemoConfig.eval_samples
    assert quick.candidates_every > 0  # points along training: the frontiers span KL
    assert main(["demo", "--candidates-every", "0", "--configs", configs]) == 0
    assert seen[-1].candidates_every == 0


@pytest.mark.slow  # the demo fixture
def test_eval_cli_scores_run_and_model_directories(demo, tmp_path, capsys):
    config, _ = demo
    seed = os.path.join(config.out_dir, "seed0")
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            os.path.join(seed, "sft"),
            os.path.join(seed, "RSA-CVaR", "b2_0.1"),
            "--task",
            "safety",
            "--reference",
            os.path.join(seed, "sft"),
            "--samples",
            "2",
            "--max-new-tokens",
            "12",
            "--n-boot",
            "20",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| b2_0.1 |" in printed and "| sft |" in printed
    rows = read_results(out)
    assert rows["sft"]["kl"].value == 0.0
    assert os.path.exists(out / "cost_tail.png")


def test_eval_cli_without_a_task_needs_a_scorer(tmp_path):
    with pytest.raises(SystemExit, match="--scorer"):
        main(["eval", str(tmp_path), "--out", str(tmp_path / "o")])
