"""Tail metrics and the prompt-clustered bootstrap, against brute-force references."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from rsa_jax.eval import (
    Estimate,
    SampleScores,
    bootstrap_metrics,
    metric_names,
    point_metrics,
    tail_metrics,
)

# ----------------------------------------------------------------------------- brute force


def cvar_tail_fraction(costs, level) -> float:
    """Mean of the worst (1 - a) fraction of n equally weighted samples, in exact rationals."""
    costs = sorted((Fraction(c) for c in costs), reverse=True)
    mass = (1 - Fraction(str(level))) * len(costs)  # samples' worth of tail
    whole = math.floor(mass)
    total = sum(costs[:whole], Fraction(0))
    if mass > whole:
        total += (mass - whole) * costs[whole]
    return float(total / mass)


def cvar_ru_min(costs, level, weights=None) -> float:
    """min over t of t + E[(C - t)_+] / (1 - a), t over the sample values (a loop)."""
    costs = np.asarray(costs, np.float64)
    weights = np.ones_like(costs) if weights is None else np.asarray(weights, np.float64)
    weights = weights / weights.sum()
    best = math.inf
    for t in costs:
        excess = sum(w * max(c - t, 0.0) for c, w in zip(costs, weights, strict=True))
        best = min(best, t + excess / (1.0 - level))
    return best


def brute_metrics(prompt, reward, cost, catastrophic, logratio, levels):
    """Every metric by loops over prompts and plain means."""
    prompts = sorted(set(prompt.tolist()))
    by_prompt = {p: np.flatnonzero(prompt == p) for p in prompts}
    out = {
        "reward_mean": float(np.mean(reward)),
        "cost_mean": float(np.mean(cost)),
        "catastrophic_rate": float(np.mean(catastrophic)),
        "prompts_with_catastrophe": sum(bool(catastrophic[i].any()) for i in by_prompt.values())
        / len(prompts),
        "worst_prompt_cost": max(float(np.mean(cost[i])) for i in by_prompt.values()),
    }
    for level in levels:
        out[f"cost_cvar_{level:g}"] = cvar_ru_min(cost, level)
    if logratio is not None:
        out["kl"] = float(np.mean(logratio))
    return out


def random_scores(rng, num_prompts, per_prompt, *, ids=None, logratio=True) -> SampleScores:
    """Prompts with a random number of samples in [1, per_prompt], prompt-level cost shifts."""
    counts = rng.integers(1, per_prompt + 1, size=num_prompts)
    ids = np.arange(num_prompts) if ids is None else np.asarray(ids)
    prompt = np.repeat(ids, counts)
    shift = np.repeat(rng.exponential(size=num_prompts), counts)
    cost = np.round(shift + rng.exponential(size=prompt.size), 1)  # rounding makes ties
    return SampleScores(
        prompt=prompt,
        reward=rng.normal(size=prompt.size) - 0.3 * cost,
        cost=cost,
        catastrophic=cost > 3.0,
        logratio=rng.normal(0.5, 1.0, size=prompt.size) if logratio else None,
    )


# ----------------------------------------------------------------------------- CVaR exactness


@pytest.mark.parametrize(
    "n, level",
    [
        (10, 0.9),  # (1 - a) n = 1
        (20, 0.9),  # 2
        (100, 0.99),  # 1
        (200, 0.99),  # 2
        (7, 0.9),  # 0.7: a fraction of one sample
        (13, 0.75),  # 3.25
        (37, 0.99),  # 0.37
        (1, 0.9),
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_cvar_matches_brute_force(n, level, ties):
    rng = np.random.default_rng(n)
    cost = rng.exponential(size=n)
    if ties:
        cost = np.round(cost * 2) / 2
    scores = SampleScores(np.zeros(n, int), np.zeros(n), cost, np.zeros(n, bool))
    got = point_metrics(scores, levels=(level,))[f"cost_cvar_{level:g}"]
    np.testing.assert_allclose(got, cvar_tail_fraction(cost, level), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, cvar_ru_min(cost, level), rtol=1e-12, atol=1e-12)


def test_cvar_splits_the_atom_at_var():
    # Nine zeros and one 10 at a = 0.85: the tail mass 1.5 is the 10 plus half of a zero.
    # (mean of C >= VaR would give 1.0 and mean of C > VaR would give 10.)
    cost = np.array([0.0] * 9 + [10.0])
    scores = SampleScores(np.arange(10), np.zeros(10), cost, np.zeros(10, bool))
    assert point_metrics(scores, levels=(0.85,))["cost_cvar_0.85"] == pytest.approx(10 / 1.5)


def test_cvar_is_order_and_prompt_invariant():
    rng = np.random.default_rng(3)
    cost = rng.exponential(size=50)
    perm = rng.permutation(50)
    a = SampleScores(np.zeros(50, int), np.zeros(50), cost, np.zeros(50, bool))
    b = SampleScores(rng.integers(0, 5, 50), np.zeros(50), cost[perm], np.zeros(50, bool))
    for level in (0.5, 0.9, 0.97):
        name = f"cost_cvar_{level:g}"
        pa = point_metrics(a, levels=(level,))[name]
        assert pa == pytest.approx(point_metrics(b, levels=(level,))[name], rel=1e-12)


# ----------------------------------------------------------------------------- point metrics


@pytest.mark.parametrize("with_logratio", [True, False])
def test_point_metrics_match_brute_force_unequal_prompts(with_logratio):
    rng = np.random.default_rng(0)
    # Non-contiguous, unsorted prompt ids with 1 to 9 samples each.
    scores = random_scores(rng, 12, 9, ids=rng.permutation(100)[:12] * 7, logratio=with_logratio)
    levels = (0.9, 0.99, 0.5)
    got = point_metrics(scores, levels=levels)
    want = brute_metrics(
        scores.prompt, scores.reward, scores.cost, scores.catastrophic, scores.logratio, levels
    )
    assert list(got) == metric_names(levels, with_kl=with_logratio)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)
    assert 0 < got["prompts_with_catastrophe"] < 1  # the case exercises both branches


def test_single_prompt_and_all_zero_costs():
    n = 8
    scores = SampleScores(
        prompt=np.full(n, 5),
        reward=np.arange(n, dtype=float),
        cost=np.zeros(n),
        catastrophic=np.zeros(n, bool),
    )
    est = tail_metrics(scores, n_boot=50)
    assert "kl" not in est
    for name, (value, low, high) in est.items():
        assert low == value == high, name  # one prompt: every replicate is the sample itself
    assert est["reward_mean"].value == pytest.approx(3.5)
    for name in ("cost_mean", "cost_cvar_0.9", "cost_cvar_0.99", "worst_prompt_cost"):
        assert est[name].value == 0.0
    assert est["catastrophic_rate"].value == est["prompts_with_catastrophe"].value == 0.0


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_replicates_match_explicit_resampling():
    """Each replicate equals the brute-force metrics of the explicitly rebuilt resampled set."""
    rng = np.random.default_rng(1)
    scores = random_scores(rng, 9, 6, ids=np.arange(9) * 3 + 1)
    levels = (0.9, 0.7)
    n_boot, seed = 25, 11
    reps = bootstrap_metrics(scores, n_boot=n_boot, seed=seed, levels=levels)
    distinct = np.unique(scores.prompt)
    draws = np.random.default_rng(seed).integers(0, distinct.size, size=(n_boot, distinct.size))
    for b in range(n_boot):
        parts, new_ids = [], []
        for j, d in enumerate(draws[b]):  # the j-th draw is a new cluster with a fresh id
            idx = np.flatnonzero(scores.prompt == distinct[d])
            parts.append(idx)
            new_ids.append(np.full(idx.size, j))
        idx, ids = np.concatenate(parts), np.concatenate(new_ids)
        want = brute_metrics(
            ids,
            scores.reward[idx],
            scores.cost[idx],
            scores.catastrophic[idx],
            scores.logratio[idx],
            levels,
        )
        for name, value in want.items():
            np.testing.assert_allclose(reps[name][b], value, rtol=1e-10, err_msg=f"{name} b={b}")


def test_interval_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(2)
    scores = random_scores(rng, 60, 8)
    est = tail_metrics(scores, n_boot=300, seed=4)
    assert list(est) == metric_names()
    for name, e in est.items():
        assert isinstance(e, Estimate)
        assert e.low <= e.value <= e.high, name
        assert e.low < e.high, name  # 60 varied prompts: a real interval
    assert tail_metrics(scores, n_boot=300, seed=4) == est
    other = tail_metrics(scores, n_boot=300, seed=5)
    assert other["cost_mean"] != est["cost_mean"]
    assert all(other[n].value == est[n].value for n in est)  # the point estimate has no seed


def test_interval_narrows_with_more_prompts():
    rng = np.random.default_rng(3)
    small = tail_metrics(random_scores(rng, 100, 4), n_boot=400)
    large = tail_metrics(random_scores(rng, 2500, 4), n_boot=400)
    for name in ("reward_mean", "cost_mean", "cost_cvar_0.9", "kl"):
        w_small = small[name].high - small[name].low
        w_large = large[name].high - large[name].low
        assert w_large < 0.4 * w_small, (name, w_small, w_large)  # 1/sqrt(25) = 0.2 expected


def test_bootstrap_resamples_prompts_not_samples():
    """k identical samples per prompt must give the intervals of one sample per prompt."""
    rng = np.random.default_rng(4)
    num_prompts, k = 40, 16
    reward, cost = rng.normal(size=num_prompts), rng.exponential(size=num_prompts)
    cat, logratio = cost > 1.5, rng.normal(size=num_prompts)
    one = SampleScores(np.arange(num_prompts), reward, cost, cat, logratio)
    rep = SampleScores(
        np.repeat(np.arange(num_prompts), k),
        np.repeat(reward, k),
        np.repeat(cost, k),
        np.repeat(cat, k),
        np.repeat(logratio, k),
    )
    est_one = tail_metrics(one, n_boot=500, seed=7)
    est_rep = tail_metrics(rep, n_boot=500, seed=7)
    for name in est_one:
        np.testing.assert_allclose(est_rep[name], est_one[name], rtol=1e-12, err_msg=name)
    # Resampling the k * P samples one by one would pretend to k times more data.
    naive = tail_metrics(
        SampleScores(np.arange(rep.prompt.size), rep.reward, rep.cost, rep.catastrophic),
        n_boot=500,
        seed=7,
    )
    width = est_rep["cost_mean"].high - est_rep["cost_mean"].low
    naive_width = naive["cost_mean"].high - naive["cost_mean"].low
    assert width > 2.5 * naive_width  # sqrt(16) = 4 expected


# ----------------------------------------------------------------------------- validation


def _fields(n=4):
    return dict(
        prompt=np.arange(n),
        reward=np.zeros(n),
        cost=np.ones(n),
        catastrophic=np.zeros(n, bool),
        logratio=np.zeros(n),
    )


@pytest.mark.parametrize("field", ["reward", "cost", "catastrophic", "logratio"])
def test_length_mismatch_names_the_field(field):
    fields = _fields()
    fields[field] = fields[field][:3]
    with pytest.raises(ValueError, match=f"SampleScores.{field} has shape"):
        SampleScores(**fields)


@pytest.mark.parametrize("field", ["reward", "cost", "logratio"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_names_the_field(field, bad):
    fields = _fields()
    fields[field] = fields[field].copy()
    fields[field][2] = bad
    with pytest.raises(ValueError, match=f"SampleScores.{field} has 1 non-finite.*sample 2"):
        SampleScores(**fields)


def test_other_invalid_inputs():
    with pytest.raises(ValueError, match="SampleScores.catastrophic must be a bool"):
        SampleScores(**{**_fields(), "catastrophic": np.zeros(4)})
    with pytest.raises(ValueError, match="SampleScores.prompt must hold integers"):
        SampleScores(**{**_fields(), "prompt": np.zeros(4)})
    with pytest.raises(ValueError, match="non-empty"):
        SampleScores(**{k: np.zeros(0, v.dtype) for k, v in _fields().items()})
    scores = SampleScores(**_fields())
    with pytest.raises(ValueError, match="levels must be in"):
        point_metrics(scores, levels=(1.0,))
    with pytest.raises(ValueError, match="n_boot"):
        tail_metrics(scores, n_boot=0)
