"""Results table, files, plots and aggregation over seeds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from rsa_jax.eval import (
    Estimate,
    SampleScores,
    aggregate_seeds,
    cost_ccdf,
    plot_cost_tail,
    plot_reward_cost,
    read_results,
    results_table,
    seeds_interval,
    tail_metrics,
    write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(seed, num_prompts=20, per_prompt=5, shift=0.0) -> SampleScores:
    rng = np.random.default_rng(seed)
    n = num_prompts * per_prompt
    cost = rng.exponential(size=n) + shift
    return SampleScores(
        np.repeat(np.arange(num_prompts), per_prompt),
        rng.normal(size=n),
        cost,
        cost > 2.5,
        rng.normal(size=n),
    )


@pytest.fixture(scope="module")
def per_sample():
    return {"dpo": _scores(0), "rsa": _scores(1, shift=-0.3), "sacpo": _scores(2)}


@pytest.fixture(scope="module")
def rows(per_sample):
    return {m: tail_metrics(s, n_boot=100) for m, s in per_sample.items()}


def _assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, path


def test_results_table_format_and_column_order():
    rows = {
        "a": {
            "worst_prompt_cost": Estimate(3.0, 2.0, 4.0),
            "cost_cvar_0.99": Estimate(5.0, 4.0, 6.0),
            "cost_cvar_0.9": Estimate(1.23456, 1.0, 1.5),
            "reward_mean": Estimate(0.1, 0.0, 0.2),
            "custom": Estimate(7.0, 7.0, 7.0),
        },
        "b": {"reward_mean": (0.25, 0.125, 0.5)},  # a tuple is accepted as well
    }
    lines = results_table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "method",
        "reward_mean",
        "cost_cvar_0.9",
        "cost_cvar_0.99",
        "worst_prompt_cost",
        "custom",
    ]
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| a | 0.1 [0, 0.2] | 1.235 [1, 1.5] | 5 [4, 6] | 3 [2, 4] | 7 [7, 7] |"
    assert lines[3] == "| b | 0.25 [0.125, 0.5] | - | - | - | - |"
    assert len(lines) == 4


def test_write_results_files(tmp_path, rows, per_sample):
    paths = write_results(tmp_path / "out", rows, per_sample)
    assert set(paths) == {"json", "md", "reward_cost", "cost_tail"}
    with open(paths["json"]) as f:
        payload = json.load(f)
    assert payload["metrics"][:2] == ["reward_mean", "cost_mean"]
    assert set(payload["metrics"]) == set(rows["dpo"])
    assert payload["methods"]["rsa"]["cost_cvar_0.9"] == rows["rsa"]["cost_cvar_0.9"]._asdict()
    assert payload["samples"]["dpo"] == {"num_samples": 100, "num_prompts": 20}
    assert "cluster bootstrap" in payload["interval"]
    assert read_results(tmp_path / "out") == rows  # JSON floats round-trip exactly
    md = open(paths["md"]).read()
    assert results_table(rows) in md and "cluster bootstrap" in md
    for method in rows:
        assert f"| {method} | " in md
    _assert_png(paths["reward_cost"])
    _assert_png(paths["cost_tail"])


def test_write_results_without_samples_or_plot_metrics(tmp_path):
    paths = write_results(tmp_path, {"m": {"kl": Estimate(1.0, 0.5, 1.5)}})
    assert set(paths) == {"json", "md"}
    assert "samples" not in json.loads(open(paths["json"]).read())
    assert not (tmp_path / "reward_cost.png").exists()


def test_plots_are_written(tmp_path, rows, per_sample):
    plot_reward_cost(rows, tmp_path / "rc.png", x="cost_cvar_0.9")
    _assert_png(tmp_path / "rc.png")
    plot_cost_tail(per_sample, tmp_path / "tail.png", threshold=2.5)
    _assert_png(tmp_path / "tail.png")
    with pytest.raises(ValueError, match="method 'a' has no metric \\['cost_mean'\\]"):
        plot_reward_cost({"a": {"reward_mean": Estimate(0, 0, 0)}}, tmp_path / "x.png")


def test_cost_ccdf_matches_brute_force():
    cost = np.array([3.0, 1.0, 1.0, 0.0, 3.0, 3.0, 2.5])
    values, prob = cost_ccdf(cost)
    np.testing.assert_array_equal(values, [0.0, 1.0, 2.5, 3.0])
    np.testing.assert_allclose(prob, [np.mean(cost >= v) for v in values], rtol=0, atol=1e-15)


def test_importing_eval_does_not_import_matplotlib():
    code = "import sys, rsa_jax.eval; print('matplotlib' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_aggregate_seeds_t_interval():
    seeds = [
        {"a": {"m": Estimate(v, v - 9, v + 9), "n": Estimate(2 * v, 0, 9)}} for v in (1.0, 2.0, 3.0)
    ]
    got = aggregate_seeds(seeds)
    # t_{0.975, 2} in closed form: (2p - 1) / sqrt(2 p (1 - p)); std of (1, 2, 3) is 1.
    p = 0.975
    half = (2 * p - 1) / math.sqrt(2 * p * (1 - p)) / math.sqrt(3)
    np.testing.assert_allclose(got["a"]["m"], [2.0, 2.0 - half, 2.0 + half], rtol=1e-12)
    np.testing.assert_allclose(got["a"]["n"], [4.0, 4.0 - 2 * half, 4.0 + 2 * half], rtol=1e-12)
    # Two seeds: t_{0.95, 1} = tan(pi (0.95 - 1/2)) at confidence 0.9.
    two = aggregate_seeds(seeds[:2], confidence=0.9)["a"]["m"]
    half2 = math.tan(math.pi * 0.45) * math.sqrt(0.5) / math.sqrt(2)
    np.testing.assert_allclose(two, [1.5, 1.5 - half2, 1.5 + half2], rtol=1e-12)
    assert aggregate_seeds(seeds[:1]) == seeds[0]  # one seed keeps its bootstrap intervals
    assert "3 seeds" in seeds_interval(3) and "bootstrap" in seeds_interval(1)
    print(results_table(got))


def test_aggregate_seeds_rejects_mismatches():
    a = {"x": {"m": Estimate(1, 0, 2)}}
    with pytest.raises(ValueError, match="seed 1 has methods"):
        aggregate_seeds([a, {"y": {"m": Estimate(1, 0, 2)}}])
    with pytest.raises(ValueError, match="seed 1 method 'x' has metrics"):
        aggregate_seeds([a, {"x": {"k": Estimate(1, 0, 2)}}])
    with pytest.raises(ValueError, match="at least one"):
        aggregate_seeds([])
