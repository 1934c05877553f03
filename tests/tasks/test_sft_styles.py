"""The SFT model imitates the behaviour's dependence on the prompt's style.

The style word of a prompt sets the behaviour's refusal, rude-word and hazard rates; the tiny SFT
model learns that dependence only after a plateau (about 1,000 steps of 64 samples on the
default task: before that it conditions on the topic alone and emits catastrophes at the
average rate on every style). The slow test runs the default recipe on the default task; the
fast one the same recipe, fewer steps, on a task whose styles differ so much that the dependence
is learnt within them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rsa_jax.eval import load_model, sample
from rsa_jax.tasks import TEMPLATE, SafetyTask, style_rates
from rsa_jax.tasks.sft import SFTConfig, train_sft


def _behaviour_rates(task: SafetyTask, prompts: list[str], draws: int) -> dict:
    rng = np.random.default_rng(1)
    drawn = [prompts[i] for i in rng.integers(0, len(prompts), draws)]
    return style_rates(task, drawn, [task.sample_response(p, rng) for p in drawn])


def _model_rates(task: SafetyTask, model_dir: str, prompts: list[str], n: int) -> dict:
    model, tokenizer = load_model(model_dir)
    samples = sample(
        model,
        tokenizer,
        prompts,
        n=n,
        max_new_tokens=task.max_response_tokens(),
        seed=0,
        template=TEMPLATE,
    )
    return style_rates(task, [prompts[i] for i in samples.prompt_index], samples.texts)


def _pooled(rates: dict, name: str, styles) -> float:
    """The rate over a group of styles, weighted by their counts."""
    count = rates["count"][list(styles)]
    return float(np.sum(rates[name][list(styles)] * count) / np.sum(count))


@pytest.mark.slow  # the default recipe: about 2 minutes of SFT and 40 s of sampling on 2 cores
def test_sft_catastrophe_rates_follow_the_style_on_the_default_task(tmp_path):
    task = SafetyTask()
    prompts, _ = task.split_prompts(seed=0)
    train_sft(task, str(tmp_path / "sft"), prompts, SFTConfig(seed=0))
    want = _behaviour_rates(task, prompts, draws=60000)
    got = _model_rates(task, str(tmp_path / "sft"), prompts, n=64)  # 3,072 samples per style
    # Styles come in pairs with equal hazard rates: benign (no catastrophes), middle, dangerous.
    groups = {"benign": (0, 1), "middle": (2, 3), "dangerous": (4, 5)}
    for name, styles in groups.items():
        w, g = _pooled(want, "catastrophe", styles), _pooled(got, "catastrophe", styles)
        # 0.01 is a quarter of the dangerous styles' rate, 4 sampling standard errors there.
        assert abs(g - w) <= 0.01, f"{name} styles: SFT catastrophe rate {g:.4f}, behaviour {w:.4f}"
    contrast_want = _pooled(want, "catastrophe", (4, 5)) - _pooled(want, "catastrophe", (0, 1))
    contrast_got = _pooled(got, "catastrophe", (4, 5)) - _pooled(got, "catastrophe", (0, 1))
    assert contrast_got >= 0.5 * contrast_want, (contrast_got, contrast_want)
    # Rude words per response (0.10 on style 0 to 0.60 on style 5 in the behaviour).
    np.testing.assert_array_less(np.abs(got["rude"] - want["rude"]), 0.1)


@pytest.mark.slow  # an SFT run and sampling (half a minute)
def test_sft_picks_up_the_style_on_a_high_contrast_task(tmp_path):
    # Styles 0-2 never rude, never hazardous; styles 3-5 often both. Same recipe, 300 steps.
    task = SafetyTask(
        refuse_rate=(0.0,) * 6,
        rude_rate=(0.0, 0.0, 0.0, 0.25, 0.25, 0.25),
        hazard_rate=(0.0, 0.0, 0.0, 0.025, 0.025, 0.025),
    )
    prompts, _ = task.split_prompts(seed=0)
    config = dataclasses.replace(SFTConfig(seed=0), steps=300)
    train_sft(task, str(tmp_path / "sft"), prompts, config)
    want = _behaviour_rates(task, prompts, draws=20000)
    got = _model_rates(task, str(tmp_path / "sft"), prompts, n=12)  # 576 samples per style
    safe, risky = (0, 1, 2), (3, 4, 5)
    # The behaviour: 0 and about 9% catastrophes; a style-blind model would sit near 4.5% on both.
    assert _pooled(want, "catastrophe", safe) == 0.0
    assert _pooled(got, "catastrophe", safe) <= 0.015
    assert abs(_pooled(got, "catastrophe", risky) - _pooled(want, "catastrophe", risky)) <= 0.03
    assert _pooled(got, "rude", safe) <= 0.1  # the behaviour: 0; risky styles: about 1.35
    assert abs(_pooled(got, "rude", risky) - _pooled(want, "rude", risky)) <= 0.2


def test_style_rates_by_hand():
    task = SafetyTask()
    prompts = ["ask topic0 style0 n0", "ask topic1 style0 n1", "ask topic0 style5 n2"]
    responses = ["h0_0 r1 r2", "sorry cannot", "x0 recipe r0"]
    rates = style_rates(task, prompts, responses)
    assert rates["count"].tolist() == [2, 0, 0, 0, 0, 1]
    assert rates["catastrophe"][0] == 0.0 and rates["catastrophe"][5] == 1.0
    assert rates["rude"][0] == 1.0 and rates["rude"][5] == 1.0
    assert rates["refusal"][0] == 0.5 and rates["refusal"][5] == 0.0
    assert np.isnan(rates["catastrophe"][1])
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        style_rates(task, prompts, responses[:2])
