"""The demo pipeline end to end at toy sizes (SFT -> pairs -> two methods -> eval -> table and
plots), its reuse of finished runs, and `rsa-jax eval` on the directories it wrote."""

from __future__ import annotations

import json
import os

import pytest

from rsa_jax.cli import main
from rsa_jax.eval import read_results
from rsa_jax.tasks.pipeline import DemoConfig, run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(
        out_dir=str(out),
        configs_dir=os.path.join(ROOT, "configs"),
        seeds=(0,),
        methods=("RSA-CVaR",),
        sft_steps=40,
        pair_prompts=256,
        batch_size=16,
        epochs=1,
        eval_samples=4,
        eval_max_tokens=12,
        n_boot=50,
    )
    rows = run_demo(config)
    return config, rows


def test_demo_writes_the_table_plots_and_pair_counts(demo):
    config, rows = demo
    out = config.out_dir
    assert set(rows) == {"SFT", "RSA-CVaR"}
    written = read_results(out)
    for method, metrics in written.items():
        for name in ("reward_mean", "cost_mean", "prompts_with_catastrophe", "cost_cvar_0.99"):
            est = metrics[name]
            assert est.low <= est.value <= est.high, (method, name, est)
    assert written["SFT"]["kl"].value == 0.0  # the SFT model is the reference
    assert written["RSA-CVaR"]["kl"].value != 0.0
    for png in ("reward_cost.png", "cost_tail.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    with open(os.path.join(out, "seed0", "data", "counts.json")) as f:
        counts = json.load(f)
    assert counts["pairs"] == 256
    assert (
        counts["helpfulness_pairs"] + counts["helpfulness_ties"] + counts["empty_response"] == 256
    )
    # RSA-CVaR ran both of its stages: its run dir holds the stage-2 (safety) checkpoint.
    with open(os.path.join(out, "seed0", "RSA-CVaR", "metrics.jsonl")) as f:
        stages = {json.loads(line).get("stage") for line in f}
    assert stages == {0, 1}


def test_rerun_reuses_finished_runs_and_restarts_changed_ones(demo, capsys):
    import dataclasses

    config, _ = demo
    capsys.readouterr()
    changed = dataclasses.replace(config, learning_rate=config.learning_rate / 2)
    run_demo(changed)
    printed = capsys.readouterr().out
    assert "RSA-CVaR: made with other settings" in printed
    assert "sft: made with other settings" not in printed  # the SFT model was reused


def test_eval_cli_scores_run_and_model_directories(demo, tmp_path, capsys):
    config, _ = demo
    seed = os.path.join(config.out_dir, "seed0")
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            os.path.join(seed, "sft"),
            os.path.join(seed, "RSA-CVaR"),
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
    assert "| RSA-CVaR |" in printed and "| sft |" in printed
    rows = read_results(out)
    assert rows["sft"]["kl"].value == 0.0
    assert os.path.exists(out / "cost_tail.png")


def test_eval_cli_without_a_task_needs_a_scorer(tmp_path):
    with pytest.raises(SystemExit, match="--scorer"):
        main(["eval", str(tmp_path), "--out", str(tmp_path / "o")])
