"""Frontiers, interpolation and reward gaps against brute force; Algorithm 1's constrained choice;
reading results files; the `rsa-jax frontier` command."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from scipy import integrate

from rsa_jax.eval import (
    Constraint,
    Estimate,
    FrontierInputError,
    constrained_choice,
    interpolate_reward,
    load_frontier_inputs,
    pareto_frontier,
    pareto_indices,
    parse_constraint,
    reward_gap,
    run_frontier,
    seed_gap,
    write_results,
)

# ---- brute force ---------------------------------------------------------------------------


def brute_frontier(cost, reward) -> set[int]:
    """Indices nobody dominates (O(K^2), straight from the definition)."""
    out = set()
    for i in range(len(cost)):
        dominated = any(
            cost[j] <= cost[i]
            and reward[j] >= reward[i]
            and (cost[j], reward[j]) != (cost[i], reward[i])
            for j in range(len(cost))
        )
        if not dominated:
            out.add(i)
    return out


def brute_reward_at(cost, reward, c) -> float:
    """R(c) from the raw points: the best point no costlier than c, then the cheapest point that
    beats it, linearly between them; NaN below the cheapest point or beyond the best one."""
    cost, reward = np.asarray(cost, float), np.asarray(reward, float)
    top = reward.max()
    c_max = cost[reward == top].min()
    if c < cost.min() or c > c_max:
        return math.nan
    r_left = reward[cost <= c].max()
    c_left = cost[(cost <= c) & (reward == r_left)].min()
    if c_left == c:
        return float(r_left)
    better = reward > r_left
    c_right = cost[better].min()
    r_right = reward[better & (cost == c_right)].max()
    return float(r_left + (r_right - r_left) * (c - c_left) / (c_right - c_left))


def _variants(cost, reward) -> dict:
    return {
        f"v{i}": {"cost_mean": Estimate(c, c, c), "reward_mean": Estimate(r, r, r)}
        for i, (c, r) in enumerate(zip(cost, reward, strict=True))
    }


def _random_points(seed: int, k: int):
    rng = np.random.default_rng(seed)
    # Small integer grids make ties in cost, in reward and exact duplicates common.
    return rng.integers(0, 5, k).astype(float), rng.integers(0, 5, k).astype(float)


# ---- frontier extraction -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_pareto_indices_match_brute_force(seed):
    cost, reward = _random_points(seed, k=1 + seed % 9)
    got = pareto_indices(cost, reward)
    assert set(got.tolist()) == brute_frontier(cost, reward)
    assert np.all(np.diff(cost[got]) >= 0)  # by increasing cost
    assert np.all(np.diff(reward[got]) >= 0)


def test_pareto_indices_ties_duplicates_and_dominated():
    # 0: (1, 1); 1: (1, 2) beats 0 at equal cost; 2: (2, 2) loses to 1 at equal reward;
    # 3 and 4: the same point (3, 4), both kept; 5: (4, 3) dominated by 3.
    cost = [1.0, 1.0, 2.0, 3.0, 3.0, 4.0]
    reward = [1.0, 2.0, 2.0, 4.0, 4.0, 3.0]
    assert pareto_indices(cost, reward).tolist() == [1, 3, 4]


def test_pareto_indices_single_point_and_bad_input():
    assert pareto_indices([2.0], [5.0]).tolist() == [0]
    with pytest.raises(ValueError, match="finite"):
        pareto_indices([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"\[K\]"):
        pareto_indices([1.0, 2.0], [1.0])


def test_pareto_frontier_keeps_intervals_and_lists_dominated():
    variants = {
        "a": {"cost_mean": Estimate(1.0, 0.8, 1.2), "reward_mean": Estimate(2.0, 1.5, 2.5)},
        "b": {"cost_mean": Estimate(2.0, 1.9, 2.1), "reward_mean": Estimate(1.0, 0.9, 1.1)},
        "c": {"cost_mean": Estimate(3.0, 2.0, 4.0), "reward_mean": Estimate(3.0, 2.0, 4.0)},
        "no_cost": {"reward_mean": Estimate(9.0, 9.0, 9.0)},
    }
    front = pareto_frontier(variants, "cost_mean")
    assert front.names == ("a", "c")
    assert front.cost[0] == Estimate(1.0, 0.8, 1.2)
    assert front.reward[1] == Estimate(3.0, 2.0, 4.0)
    assert front.dominated == ("b",)
    assert pareto_frontier(variants, "kl") is None


# ---- interpolation -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_interpolation_matches_brute_force(seed):
    cost, reward = _random_points(seed, k=1 + seed % 9)
    front = pareto_frontier(_variants(cost, reward), "cost_mean")
    queries = np.linspace(-1.0, 6.0, 57)  # below, inside (on and between points) and above
    got = interpolate_reward(front, queries)
    want = np.array([brute_reward_at(cost, reward, c) for c in queries])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=1e-12)


def test_interpolation_single_point_is_defined_only_at_its_cost():
    front = pareto_frontier(_variants([2.0], [5.0]), "cost_mean")
    got = interpolate_reward(front, [1.9, 2.0, 2.1])
    assert np.isnan(got[0]) and got[1] == 5.0 and np.isnan(got[2])


# ---- reward gap ----------------------------------------------------------------------------


def brute_gap(cost_a, reward_a, cost_b, reward_b):
    lo = max(min(cost_a), min(cost_b))
    hi_a = min(c for c, r in zip(cost_a, reward_a, strict=True) if r == max(reward_a))
    hi_b = min(c for c, r in zip(cost_b, reward_b, strict=True) if r == max(reward_b))
    hi = min(hi_a, hi_b)
    if lo > hi:
        return None

    def diff(c):
        return brute_reward_at(cost_a, reward_a, c) - brute_reward_at(cost_b, reward_b, c)

    if lo == hi:
        return diff(lo)
    breaks = sorted({c for c in [*cost_a, *cost_b] if lo < c < hi})
    area, _ = integrate.quad(diff, lo, hi, points=breaks or None, epsabs=1e-13, epsrel=1e-13)
    return area / (hi - lo)


@pytest.mark.parametrize("seed", range(40))
def test_reward_gap_matches_brute_force(seed):
    rng = np.random.default_rng(1000 + seed)
    k_a, k_b = rng.integers(1, 7, 2)
    cost_a, reward_a = rng.uniform(0, 4, k_a).round(1), rng.uniform(0, 4, k_a).round(1)
    cost_b, reward_b = rng.uniform(0, 4, k_b).round(1), rng.uniform(0, 4, k_b).round(1)
    a = pareto_frontier(_variants(cost_a, reward_a), "cost_mean")
    b = pareto_frontier(_variants(cost_b, reward_b), "cost_mean")
    want = brute_gap(cost_a, reward_a, cost_b, reward_b)
    got = reward_gap(a, b)
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert reward_gap(b, a) == pytest.approx(-want, rel=1e-9, abs=1e-9)


def test_reward_gap_by_hand():
    # A is B shifted up by 1 on [0, 2]; B's range is [1, 3]: overlap [1, 2], gap 1.
    a = pareto_frontier(_variants([0.0, 2.0], [1.0, 3.0]), "cost_mean")
    b = pareto_frontier(_variants([1.0, 3.0], [1.0, 3.0]), "cost_mean")
    assert reward_gap(a, b) == pytest.approx(1.0)
    # Crossing frontiers: A - B goes from +1 to -1 linearly, the mean is 0.
    c = pareto_frontier(_variants([0.0, 1.0], [1.0, 2.0]), "cost_mean")
    d = pareto_frontier(_variants([0.0, 1.0], [0.0, 3.0]), "cost_mean")
    assert reward_gap(c, d) == pytest.approx(0.0, abs=1e-12)


def test_reward_gap_non_overlapping_touching_and_single_points():
    a = pareto_frontier(_variants([0.0, 1.0], [0.0, 1.0]), "cost_mean")
    far = pareto_frontier(_variants([2.0, 3.0], [5.0, 6.0]), "cost_mean")
    assert reward_gap(a, far) is None
    touching = pareto_frontier(_variants([1.0, 2.0], [4.0, 5.0]), "cost_mean")
    assert reward_gap(a, touching) == pytest.approx(1.0 - 4.0)  # only c = 1 is shared
    single = pareto_frontier(_variants([0.5], [2.0]), "cost_mean")
    assert reward_gap(single, a) == pytest.approx(2.0 - 0.5)
    assert reward_gap(single, single) == 0.0


def test_seed_gap_is_a_t_interval_over_paired_seeds():
    def seed(shift):
        return {
            "A": _variants([0.0, 1.0], [1.0 + shift, 2.0 + shift]),
            "B": _variants([0.0, 1.0], [0.0, 1.0]),
        }

    apart = {"A": _variants([5.0], [1.0]), "B": _variants([0.0, 1.0], [0.0, 1.0])}
    seeds = {"0": seed(0.0), "1": seed(2.0), "2": apart}
    gap = seed_gap(seeds, "A", "B", "cost_mean")
    assert gap.per_seed == pytest.approx({"0": 1.0, "1": 3.0})
    assert "do not overlap" in gap.skipped["2"]
    t = 12.706204736174698  # Student t_{0.975} with 1 degree of freedom
    half = t * math.sqrt(2.0) / math.sqrt(2.0)
    assert gap.estimate.value == pytest.approx(2.0)
    assert gap.estimate.low == pytest.approx(2.0 - half)
    assert gap.estimate.high == pytest.approx(2.0 + half)
    one = seed_gap({"0": seed(0.0)}, "A", "B", "cost_mean")
    assert one.estimate.value == pytest.approx(1.0) and math.isnan(one.estimate.low)
    none = seed_gap({"0": {"A": _variants([0.0], [1.0])}}, "A", "B", "cost_mean")
    assert none.estimate is None and "for B" in none.skipped["0"]


# ---- Algorithm 1's constrained choice ------------------------------------------------------


def _table():
    def e(*x):
        return Estimate(*x)

    rate = "catastrophic_rate"
    return {
        # value meets 0.01, upper bound does not: not safe.
        "beta=0.1": {"reward_mean": e(3.0, 2.9, 3.1), rate: e(0.008, 0.005, 0.012)},
        "beta=0.05": {"reward_mean": e(2.5, 2.4, 2.6), rate: e(0.006, 0.004, 0.009)},
        # same reward as beta=0.05, higher statistic: loses the tie.
        "beta=0.03": {
            "reward_mean": e(2.5, 2.4, 2.6),
            rate: e(0.007, 0.004, 0.0095),
        },
        "beta=0.01": {"reward_mean": e(2.0, 1.9, 2.1), rate: e(0.002, 0.001, 0.004)},
        "no_stat": {"reward_mean": e(9.0, 9.0, 9.0)},
    }


def test_constrained_choice_uses_the_upper_bound():
    choice = constrained_choice(_table(), parse_constraint("catastrophic_rate<=0.01"))
    assert choice.variant == "beta=0.05"
    assert choice.reward == Estimate(2.5, 2.4, 2.6)
    assert choice.statistic.high == 0.009
    assert choice.safe == ("beta=0.05", "beta=0.03", "beta=0.01")
    assert choice.missing == ("no_stat",)
    assert choice.closest is None
    loose = constrained_choice(_table(), Constraint("catastrophic_rate", 0.012))
    assert loose.variant == "beta=0.1"  # the bound is inclusive


def test_constrained_choice_empty_safe_set():
    choice = constrained_choice(_table(), parse_constraint("catastrophic_rate <= 0.003"))
    assert choice.variant is None and choice.reward is None and choice.safe == ()
    assert choice.closest == "beta=0.01"
    nothing = constrained_choice({"x": {"reward_mean": Estimate(1, 1, 1)}}, Constraint("kl", 1.0))
    assert nothing.variant is None and nothing.closest is None and nothing.missing == ("x",)


def test_parse_constraint():
    assert parse_constraint("cost_cvar_0.99<=5") == Constraint("cost_cvar_0.99", 5.0)
    assert parse_constraint(" catastrophic_rate <= 1e-2 ") == Constraint("catastrophic_rate", 0.01)
    for bad in ("catastrophic_rate<0.01", "catastrophic_rate>=0.01", "<=3", "kl<=x", "kl<=nan"):
        with pytest.raises(ValueError, match="expected STATISTIC<=NUMBER"):
            parse_constraint(bad)


# ---- results files and the command ---------------------------------------------------------


def _rows(shift: float) -> dict:
    e = Estimate

    def point(reward, rate, kl):
        return {
            "reward_mean": e(reward, reward - 0.1, reward + 0.1),
            "catastrophic_rate": e(rate, rate * 0.5, rate * 1.5),
            "kl": e(kl, kl, kl),
        }

    return {
        "SFT": point(2.0, 0.018, 0.0),
        "SACPO b2=0.1": point(3.0 + shift, 0.016, 2.0),
        "SACPO b2=0.05": point(3.2 + shift, 0.020, 2.5),
        "RSA-CVaR b2=0.1": point(3.1 + shift, 0.015, 2.1),
        "RSA-CVaR b2=0.05": point(3.4 + shift, 0.019, 3.0),
    }


def test_load_demo_seeds_and_run_frontier(tmp_path, capsys):
    demo = tmp_path / "demo"
    for seed, shift in ((0, 0.0), (1, 0.1)):
        write_results(demo / f"seed{seed}", _rows(shift))
    write_results(demo, _rows(5.0))  # the aggregate: must be ignored in favour of the seeds
    loaded = load_frontier_inputs([str(demo)])
    assert sorted(loaded.seeds) == ["0", "1"]
    assert set(loaded.seeds["0"]["SACPO"]) == {"b2=0.1", "b2=0.05"}
    assert set(loaded.seeds["1"]["SFT"]) == {"SFT"}

    out = tmp_path / "frontier"
    status = run_frontier(
        [str(demo)],
        ["catastrophic_rate<=0.03", "catastrophic_rate<=0.01"],
        out=str(out),
        methods=["SACPO", "RSA-CVaR"],
    )
    assert status == 0
    text = capsys.readouterr().out
    assert "EMPTY SAFE SET" in text
    summary = json.loads((out / "frontier.json").read_text())
    assert summary["statistics"] == ["catastrophic_rate", "kl"]  # cost_mean and CVaR absent
    choice = summary["choices"]["catastrophic_rate<=0.03"]["RSA-CVaR"]
    assert choice["variant"] == "b2=0.05"  # upper bounds (t over 2 seeds) 0.0285 and 0.0225
    assert summary["choices"]["catastrophic_rate<=0.01"]["SACPO"]["variant"] is None
    gap = next(g for g in summary["gaps"] if g["statistic"] == "kl" and g["a"] == "SACPO")
    # kl ranges [2, 2.5] and [2.1, 3]: overlap [2.1, 2.5]. Per seed, SACPO's R on it is
    # 3.0 + 0.4 (c - 2) + shift and RSA-CVaR's 3.1 + (0.3 / 0.9)(c - 2.1) + shift.
    c = np.linspace(2.1, 2.5, 100001)
    want = np.mean((3.0 + 0.4 * (c - 2.0)) - (3.1 + (0.3 / 0.9) * (c - 2.1)))
    assert gap["per_seed"]["0"] == pytest.approx(want, abs=1e-6)
    assert gap["per_seed"]["1"] == pytest.approx(want, abs=1e-6)
    for name in ("frontier.md", "frontier_catastrophic_rate.png", "frontier_kl.png"):
        assert (out / name).stat().st_size > 0


def _sweep_results(tmp_path, name, seeds=(0, 1)):
    root = tmp_path / name
    variants = []
    for seed in seeds:
        for risk, beta, reward in (("cvar", 0.1, 3.0), ("cvar", 0.05, 3.3), ("erm", 0.1, 2.8)):
            vname = f"s1.risk-{risk}__s1.beta-{beta}__seed-{seed}"
            overrides = [f"stages.1.risk={risk}", f"stages.1.beta={beta}", f"train.seed={seed}"]
            metrics = {
                "reward_mean": {"value": reward + seed, "low": reward - 1, "high": reward + 9},
                "cost_mean": {"value": beta, "low": beta / 2, "high": beta * 2},
            }
            (root / vname).mkdir(parents=True)
            if risk == "cvar":  # the eval hook's cache, with intervals
                payload = {"options": {}, "metrics": metrics}
                (root / vname / "eval.json").write_text(json.dumps(payload))
            values = {k: v["value"] for k, v in metrics.items()}
            variants.append(
                {"name": vname, "overrides": overrides, "run_dir": "elsewhere", "eval": values}
            )
    payload = {"sweep": "s.yaml", "base": "configs/rsa_cvar.yaml", "variants": variants}
    (root / "results.json").write_text(json.dumps(payload))
    return root


def test_load_sweep_results_method_keys_and_seeds(tmp_path):
    root = _sweep_results(tmp_path, "sweep")
    loaded = load_frontier_inputs([str(root)])
    assert sorted(loaded.seeds) == ["0", "1"]
    variants = loaded.seeds["1"]["rsa_cvar"]  # the base config's stem names the method
    assert set(variants) == {
        "stages.1.risk=cvar stages.1.beta=0.1",
        "stages.1.risk=cvar stages.1.beta=0.05",
        "stages.1.risk=erm stages.1.beta=0.1",
    }
    # eval.json (beside results.json) gives the interval; without it the value is the interval.
    assert variants["stages.1.risk=cvar stages.1.beta=0.05"]["reward_mean"] == (4.3, 2.3, 12.3)
    assert variants["stages.1.risk=erm stages.1.beta=0.1"]["reward_mean"] == (3.8, 3.8, 3.8)
    assert any("no eval.json" in n for n in loaded.notes)
    by_risk = load_frontier_inputs([str(root)], method_keys=["stages.1.risk"])
    assert set(by_risk.seeds["0"]) == {"stages.1.risk=cvar", "stages.1.risk=erm"}
    assert set(by_risk.seeds["0"]["stages.1.risk=cvar"]) == {
        "stages.1.beta=0.1",
        "stages.1.beta=0.05",
    }
    with pytest.raises(FrontierInputError, match="no override for method key"):
        load_frontier_inputs([str(root)], method_keys=["stages.0.beta"])


def test_input_errors_name_the_file(tmp_path):
    with pytest.raises(FrontierInputError, match="no results.json"):
        load_frontier_inputs([str(tmp_path)])
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(FrontierInputError, match=r"bad/results.json: not JSON"):
        load_frontier_inputs([str(bad.parent)])
    bad.write_text(json.dumps({"methods": {"A": {"reward_mean": {"value": 1.0}}}}))
    with pytest.raises(FrontierInputError, match=r"methods\.A\.reward_mean"):
        load_frontier_inputs([str(bad)])
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(FrontierInputError, match="neither"):
        load_frontier_inputs([str(bad)])
    # The same method and variant twice in one seed.
    for name in ("a", "b"):
        write_results(tmp_path / name, {"A": {"reward_mean": Estimate(1, 1, 1)}})
    with pytest.raises(FrontierInputError, match="also in"):
        load_frontier_inputs([str(tmp_path / "a"), str(tmp_path / "b")])


def test_cli_frontier(tmp_path, capsys):
    from rsa_jax.cli import main

    demo = tmp_path / "demo"
    write_results(demo / "seed0", _rows(0.0))
    assert main(["frontier", str(demo), "--constraint", "kl<=2.05"]) == 0
    text = capsys.readouterr().out
    assert "## Constrained optimum: kl<=2.05" in text
    assert "| SACPO | b2=0.1 |" in text
    assert not os.path.exists(tmp_path / "frontier.json")
    assert main(["frontier", str(demo), "--constraint", "catastrophic<=1"]) == 2
    assert "catastrophic" in capsys.readouterr().err


def test_pool_seeds_means_over_the_seeds_that_have_a_variant():
    from rsa_jax.eval import Loaded, pool_seeds

    e = Estimate
    seeds = {
        "0": {"A": {"v": {"reward_mean": e(1.0, 0.5, 1.5), "kl": e(2.0, 2.0, 2.0)}}},
        "1": {"A": {"v": {"reward_mean": e(3.0, 2.5, 3.5)}, "w": {"reward_mean": e(5, 4, 6)}}},
    }
    notes: list[str] = []
    pooled, interval = pool_seeds(Loaded(seeds, [], []), notes)
    assert "2 seeds" in interval
    v = pooled["A"]["v"]
    assert set(v) == {"reward_mean"}  # kl is missing from seed 1
    half = 12.706204736174698 * math.sqrt(2.0) / math.sqrt(2.0)
    assert v["reward_mean"] == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert pooled["A"]["w"]["reward_mean"] == (5, 4, 6)  # one seed: its own interval
    assert notes == ["A w: in 1 of 2 seeds"]


def test_frontier_statistics_are_metrics_that_tail_metrics_reports():
    from rsa_jax.eval import FRONTIER_STATISTICS, metric_names

    assert set(FRONTIER_STATISTICS) <= set(metric_names())
    assert "reward_mean" in metric_names()
