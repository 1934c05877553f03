"""The frontier report can say "tied" (issue 25, item 4): a verdict per pair of methods and for
each chosen variant at the stated confidence, none with one seed, the user's variant names with
--method-key (never a wrong "(base)"), and constant statistics left out."""

from __future__ import annotations

import json

from rsa_jax.eval import Estimate, run_frontier
from rsa_jax.eval._frontier import Gap, gap_verdict

# method risk -> variant label -> (beta, reward, cost) of seed 0; other seeds add `shift`.
VARIANTS = {
    "cvar": {"low_lr": (0.1, 3.0, 0.2), "high_lr": (0.05, 3.004, 0.4)},
    "erm": {"low_lr": (0.1, 2.9, 0.2), "high_lr": (0.05, 2.996, 0.4)},
}


def _write_seed(root, seed: int, shift: dict[str, float], cost_zero: bool = False) -> None:
    variants = []
    for risk, per in VARIANTS.items():
        for label, (beta, reward, cost) in per.items():
            reward += shift.get(risk, 0.0) * seed
            cost = 0.0 if cost_zero else cost
            name = f"{label}__s1.risk-{risk}__seed-{seed}"
            overrides = [
                f"stages.1.beta={beta}",
                f"stages.1.risk={risk}",
                f"train.seed={seed}",
            ]
            metrics = {
                "reward_mean": {"value": reward, "low": reward - 0.05, "high": reward + 0.05},
                "cost_mean": {"value": cost, "low": cost * 0.9, "high": cost * 1.1},
            }
            (root / name).mkdir(parents=True)
            (root / name / "eval.json").write_text(json.dumps({"options": {}, "metrics": metrics}))
            variants.append(
                {"name": name, "label": label, "overrides": overrides, "run_dir": "elsewhere"}
            )
    payload = {"sweep": "s.yaml", "base": "configs/rsa_cvar.yaml", "variants": variants}
    (root / "results.json").write_text(json.dumps(payload))


def _report(tmp_path, capsys, seeds, shift, **kwargs) -> str:
    dirs = []
    for seed in seeds:
        root = tmp_path / f"seed{seed}"
        _write_seed(root, seed, shift, **kwargs)
        dirs.append(str(root))
    code = run_frontier(
        dirs,
        ["cost_mean<=0.5"],
        method_keys=["stages.1.risk"],
        statistics=("cost_mean",),
    )
    assert code == 0
    return capsys.readouterr().out


def test_gap_verdicts():
    def gap(low, high, seeds=3):
        per_seed = {str(i): 0.0 for i in range(seeds)}
        return Gap("A", "B", "cost_mean", Estimate(0.0, low, high), per_seed, {})

    assert gap_verdict(gap(-0.01, 0.02)) == "tied (the interval covers 0)"
    assert gap_verdict(gap(0.01, 0.02)) == "A > B (the interval excludes 0)"
    assert gap_verdict(gap(-0.03, -0.01)) == "B > A (the interval excludes 0)"
    assert gap_verdict(gap(float("nan"), float("nan"), 1)) == "no interval (1 seed): no verdict"


def test_close_methods_read_as_tied_and_far_ones_as_distinguishable(tmp_path, capsys):
    # The per-seed gaps cvar - erm wobble around 0.05: +0.05, +0.05 -/+ 0.2 -> tied.
    out = _report(tmp_path / "tied", capsys, (0, 1, 2), {"cvar": 0.0, "erm": 0.1})
    assert "- cost_mean: stages.1.risk=cvar - stages.1.risk=erm: tied" in out
    # Every seed +0.05 -> +0.05 exactly, zero spread: distinguishable.
    out = _report(tmp_path / "apart", capsys, (0, 1, 2), {})
    assert (
        "- cost_mean: stages.1.risk=cvar - stages.1.risk=erm: stages.1.risk=cvar > "
        "stages.1.risk=erm (the interval excludes 0)"
    ) in out


def test_one_seed_has_no_interval_and_no_verdict(tmp_path, capsys):
    out = _report(tmp_path, capsys, (0,), {})
    assert "stages.1.risk=cvar - stages.1.risk=erm: no interval (1 seed): no verdict" in out
    assert " > " not in out.split("Verdicts")[1].split("##")[0]


def test_chosen_variant_names_and_ties(tmp_path, capsys):
    out = _report(tmp_path, capsys, (0,), {})
    # The user's names survive --method-key, and no variant is called "(base)".
    assert "| stages.1.risk=cvar | high_lr stages.1.beta=0.05 |" in out
    assert "(base)" not in out
    # 3.004 [2.954, 3.054] vs 3.0 [2.95, 3.05]: chosen, but tied with the other.
    assert (
        "- stages.1.risk=cvar: high_lr stages.1.beta=0.05 is tied with low_lr "
        "stages.1.beta=0.1 (reward intervals overlap" in out
    )


def test_a_constant_statistic_is_left_out(tmp_path, capsys):
    dirs = []
    for seed in (0, 1):
        root = tmp_path / f"seed{seed}"
        _write_seed(root, seed, {}, cost_zero=True)
        dirs.append(str(root))
    assert run_frontier(dirs, method_keys=["stages.1.risk"], statistics=("cost_mean",)) == 0
    out = capsys.readouterr().out
    assert "cost_mean is 0 for every variant; its frontier and gaps are left out" in out
    assert "## reward_mean vs cost_mean" not in out and "Reward gap" not in out
