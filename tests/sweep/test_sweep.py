"""Sweep files parse with errors that name the file and key; sequential variants sharing a kernel
compile once and a rerun skips them; vmap mode trains the same variants to the same parameters
and losses as the trainer; the CLI's dry run lists the variants."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from rsa_jax.cli import main
from rsa_jax.config import load_config
from rsa_jax.data import write_toy_data
from rsa_jax.sweep import SweepError, format_value, is_done, load_sweep, run_sequential, run_sweep
from rsa_jax.sweep._file import grouped
from rsa_jax.sweep._vmap import check_vmappable
from rsa_jax.training import load_policy
from rsa_jax.training._engine import cached_steps, clear_step_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _write(path, doc) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


def _sweep(tmp_path, **doc) -> str:
    doc = {"base": TINY, "run_dir": str(tmp_path / "runs"), **doc}
    return _write(tmp_path / "sweep.yaml", doc)


# ---------------------------------------------------------------- parsing (no training)


def test_grid_and_variants_give_named_cartesian_product(tmp_path):
    path = _sweep(
        tmp_path,
        overrides=["stages.0.steps=2"],
        grid={"stages.0.risk": ["cvar_reference", "erm"], "stages.1.beta": [0.1, 0.05]},
        variants=[{"name": "a"}, {"name": "b", "overrides": ["optim.learning_rate=1.0e-4"]}],
    )
    sweep = load_sweep(path)
    names = [v.name for v in sweep.variants]
    assert len(names) == 8 and len(set(names)) == 8
    assert names[0] == "a__s0.risk-cvar_reference__s1.beta-0.1"
    assert names[-1] == "b__s0.risk-erm__s1.beta-0.05"
    last = sweep.variants[-1]
    # The base's mu 0.95 is a CVaR level; switched to ERM, the stage takes ERM's own default
    # coefficient, shown among the variant's overrides (issue 25, item 5).
    assert last.overrides == (
        "optim.learning_rate=1.0e-4",
        "stages.0.risk=erm",
        "stages.1.beta=0.05",
        "stages.0.mu=5.0",
    )
    assert last.config.stages[0].risk == "erm" and last.config.stages[1].beta == 0.05
    assert last.config.stages[0].mu == 5.0 and sweep.variants[0].config.stages[0].mu == 0.95
    assert last.config.optim.learning_rate == 1e-4 and last.config.stages[0].steps == 2
    assert last.run_dir == os.path.join(str(tmp_path / "runs"), last.name)
    # The same file gives the same names (they name the run directories).
    assert [v.name for v in load_sweep(path).variants] == names
    # Grouped by kernel: the two risks of stage 0.
    groups = grouped(sweep.variants)
    assert [len(g) for g in groups] == [4, 4]
    assert {g[0].config.stages[0].risk for g in groups} == {"cvar_reference", "erm"}


@pytest.mark.parametrize("value", [1e-5, 3e-3, 0.1, 2.5e-20, 7, True, "erm"])
def test_grid_values_round_trip_through_overrides(value):
    key = {
        float: "optim.learning_rate",
        int: "stages.0.steps",
        bool: "model.remat",
        str: "stages.0.risk",
    }[type(value)]
    config = load_config(TINY, [f"{key}={format_value(value)}"])
    section, *rest = key.split(".")
    got = (
        getattr(config.stages[0], rest[1])
        if section == "stages"
        else getattr(getattr(config, section), rest[0])
    )
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "doc,words",
    [
        ({"grid": {"stages.0.beta": [0.1]}, "colour": 1}, ["unknown key", "colour"]),
        ({"grid": {"stages.0.bta": [0.1]}}, ["s0.bta-0.1", "stages.0.bta"]),
        ({"grid": {"stages.0.beta": [-1.0]}}, ["stages.0.beta", "must be > 0"]),
        ({"grid": {"stages.0.risk": ["cvar", "var"]}}, ["s0.risk-var", "stages.0.risk"]),
        ({"grid": {"stages.0.beta": 0.1}}, ["grid.stages.0.beta", "non-empty list"]),
        ({"grid": {"stages.0.beta": [0.1, 0.1]}}, ["grid.stages.0.beta", "repeated"]),
        ({"grid": {"stages.0.beta": [[0.1]]}}, ["grid.stages.0.beta", "not a scalar"]),
        ({"variants": [{"name": "x", "overides": []}]}, ["variants.0", "overides"]),
        ({"variants": [{"name": "a b"}]}, ["variants.0.name", "'a b'"]),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, ["two variants", "'a'"]),
        ({"variants": [{"name": "a", "overrides": ["beta"]}]}, ["variants.0.overrides", "beta"]),
        ({"overrides": ["train.run_dir=x"], "grid": {"stages.0.beta": [0.1]}}, ["train.run_dir"]),
        ({"grid": {"stages.0.beta": [0.1]}, "mode": "pmap"}, ["mode", "pmap"]),
        ({"run_dir": "r"}, ["grid, variants or both"]),
        ({"base": "nowhere.yaml", "grid": {"stages.0.beta": [0.1]}}, ["base", "nowhere.yaml"]),
        ({"grid": {"stages.0.beta": [0.1]}, "eval": [1]}, ["eval must be a mapping"]),
    ],
)
def test_bad_sweep_files_name_the_file_and_the_key(tmp_path, doc, words):
    path = _sweep(tmp_path, **doc)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    message = str(e.value)
    assert message.startswith(path), message
    for w in words:
        assert w in message, (w, message)


def test_vmap_mode_rejects_variants_with_another_kernel_or_shape(tmp_path):
    risks = load_sweep(_sweep(tmp_path, grid={"stages.0.risk": ["cvar_reference", "erm"]}))
    with pytest.raises(SweepError, match=r"s0.risk-erm.*stages\.0\.risk.*different kernel"):
        check_vmappable(list(risks.variants))
    sizes = load_sweep(_sweep(tmp_path, grid={"data.batch_size": [4, 2]}))
    with pytest.raises(SweepError, match=r"data\.batch_size.*not a traced hyperparameter"):
        check_vmappable(list(sizes.variants))
    hyper = load_sweep(
        _sweep(
            tmp_path,
            grid={
                "stages.1.beta": [0.1, 0.05],
                "stages.0.mu": [0.9, 0.5],
                "optim.learning_rate": [1.0e-3, 1.0e-4],
                "optim.weight_decay": [0.0, 0.1],
            },
        )
    )
    check_vmappable(list(hyper.variants))  # traced hyperparameters only: accepted


def test_cli_dry_run_prints_variants_and_trains_nothing(tmp_path, capsys):
    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=8)
    path = _sweep(
        tmp_path,
        overrides=[f"data.path={data}"],
        grid={"stages.0.risk": ["cvar_reference", "erm"], "stages.1.beta": [0.1, 0.05]},
    )
    assert main(["sweep", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 variant(s), mode sequential" in out and "kernel group 2/2" in out
    assert "s0.risk-erm__s1.beta-0.1: stages.0.risk=erm" in out
    assert not os.path.exists(tmp_path / "runs")
    # vmap mode runs one program: a risk grid is refused by the dry run already (issue 25, 5).
    assert main(["sweep", path, "--dry-run", "--mode", "vmap"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: vmap mode:" in err and "stages.0.risk" in err and "a different kernel" in err
    assert not os.path.exists(tmp_path / "runs")
    bad = _sweep(tmp_path, grid={"stages.0.risk": ["var"]})
    assert main(["sweep", bad, "--dry-run"]) == 2
    assert "stages.0.risk" in capsys.readouterr().err


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "pairs.jsonl")
    write_toy_data(path, rows=32)
    return path


def _run_sweep_file(directory, data_path, **doc):
    """Stage 1 on the learnable view against the initial model, stage 2 against stage 1.

    Two choices keep the vmap-vs-trainer comparison well conditioned (the two programs sum in
    different orders, so they agree to rounding, not bitwise): stage 2 uses ERM, because at its
    first step policy == reference, every log-ratio is 0 up to rounding, and a CVaR threshold
    would pick its tail from that noise; and Adam's eps is 1e-6, because Adam moves a parameter
    whose gradient is zero up to rounding (|g| ~ 1e-11) by lr * |g| / eps, which at eps = 1e-8
    turns rounding into 1e-4 differences on a few entries (seen: 11 of 30k embedding entries).
    """
    shared = [
        f"data.path={data_path}",
        "checkpoint.every=0",
        "stages.0.view=safety",
        "stages.0.steps=3",
        "stages.1.steps=2",
        "stages.1.risk=erm",
        "stages.1.mu=0.5",
        "optim.eps=1.0e-6",
    ]
    doc = {"base": TINY, "overrides": shared, "run_dir": str(directory / "runs"), **doc}
    return _write(directory / "sweep.yaml", doc)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, data_path):
    directory = tmp_path_factory.mktemp("sequential")
    path = _run_sweep_file(
        directory,
        data_path,
        grid={"stages.1.beta": [0.1, 0.05]},
        variants=[
            {"name": "a", "overrides": ["stages.0.mu=0.5"]},
            {"name": "b", "overrides": ["optim.weight_decay=0.1", "optim.max_grad_norm=0.5"]},
        ],
    )
    clear_step_cache()
    sweep = load_sweep(path)
    results = run_sweep(sweep)
    return path, sweep, results, cached_steps()


@pytest.mark.slow  # the module's sequential sweep (about 1 min on 2 cores)
def test_sequential_variants_sharing_a_kernel_compile_once(sequential):
    _, sweep, results, cache = sequential
    assert len(sweep.variants) == 4
    assert all(r["status"] == "done" for r in results["variants"])
    # Two kernels (stage 1 cvar_reference, stage 2 erm) -> two jitted steps, each compiled
    # exactly once for the 4 variants.
    assert len(cache) == 2
    assert [fn._cache_size() for fn in cache] == [1, 1]
    # The variants trained with their own hyperparameters.
    finals = {r["name"]: r["final"]["loss"] for r in results["variants"]}
    assert len({round(v, 6) for v in finals.values()}) == 4, finals


@pytest.mark.slow  # the module's sequential sweep
def test_results_table_json_and_plot(sequential):
    _, sweep, results, _ = sequential
    run_dir = sweep.run_dir
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    assert [r["name"] for r in saved["variants"]] == [v.name for v in sweep.variants]
    row = saved["variants"][0]
    assert row["overrides"] == list(sweep.variants[0].overrides)
    for key in ("loss", "rewards/accuracies", "rewards/margins", "kl/chosen", "kl/rejected"):
        assert np.isfinite(row["final"][key]), key
    with open(os.path.join(run_dir, "results.md")) as f:
        table = f.read()
    assert sweep.variants[-1].name in table and "`stages.0.mu=0.5`" in table
    with open(os.path.join(run_dir, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the module's sequential sweep
def test_rerun_skips_finished_variants(sequential, capsys):
    path, sweep, _, _ = sequential
    assert all(is_done(v) for v in sweep.variants)
    capsys.readouterr()
    status = run_sequential(load_sweep(path))
    assert set(status.values()) == {"skipped"}
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4


def _losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[(r["stage"], r["step"])] = r["loss"]
    return out


@pytest.mark.slow  # a vmap sweep beside the sequential one (about 80 s on 2 cores)
def test_vmap_mode_equals_sequential_runs(sequential, tmp_path):
    """Per variant: the same losses at every step and the same final parameters (float32, to
    1e-5; see `_run_sweep_file` for why not bitwise).

    Variant a's stage 1 (stages.0: cvar_reference, mu = 0.5, 231 tokens per vocabulary half) has an
    integer quantile rank, where torch's threshold is the rank-k value itself: with a threshold
    on that value, the fused head's backward pass (which recomputes d) counted the rank-k token
    in one program and not the other, and the tied embedding row of that token (230) ended
    2.8e-5 apart. `cvar_reference_threshold` now cuts in the middle of the gap (measured
    after the fix: 5.1e-7 at most, over all parameters)."""
    path, sweep, _, _ = sequential
    vm = load_sweep(path, mode="vmap", run_dir=str(tmp_path / "vmap"))
    results = run_sweep(vm)
    assert [r["status"] for r in results["variants"]] == ["done"] * len(vm.variants)
    for a, b in zip(sweep.variants, vm.variants, strict=True):
        assert a.name == b.name
        seq_losses, vmap_losses = _losses(a.run_dir), _losses(b.run_dir)
        assert seq_losses.keys() == vmap_losses.keys() and len(seq_losses) == 5
        for key in seq_losses:
            assert vmap_losses[key] == pytest.approx(seq_losses[key], abs=1e-5), (a.name, key)
        pa, pb = load_policy(a.run_dir)[1], load_policy(b.run_dir)[1]
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_allclose(
                np.asarray(pb[k]), np.asarray(pa[k]), rtol=0, atol=1e-5, err_msg=f"{a.name} {k}"
            )
    # A rerun finds every vmap variant finished (its final checkpoint is a trainer checkpoint).
    assert all(is_done(v) for v in vm.variants)


@pytest.mark.slow  # a third kernel pair compiled on top of the module's runs
def test_a_different_risk_is_another_compile_and_runs_in_its_group(tmp_path, data_path):
    path = _run_sweep_file(
        tmp_path, data_path, grid={"stages.1.beta": [0.1, 0.05], "stages.1.risk": ["erm", "kl"]}
    )
    clear_step_cache()
    sweep = load_sweep(path)
    status = run_sequential(sweep)
    assert list(status) == [v.name for g in grouped(sweep.variants) for v in g]
    # The grid alternates the risks; the run groups them (one compile, then its reuses).
    assert [v.config.stages[1].risk for v in sweep.variants] == ["erm", "kl", "erm", "kl"]
    assert [n.split("-")[-1] for n in status] == ["erm", "erm", "kl", "kl"]
    sizes = sorted(fn._cache_size() for fn in cached_steps())
    assert sizes == [1, 1, 1]  # cvar_reference (stage 1), erm, kl: one compile each


_FAKE_EVAL = """
import json, os
CALLS = []


def evaluate(run_dir, config, scale=1.0):
    CALLS.append(run_dir)
    return {"cost_mean": scale * config.stages[1].beta, "worst_prompt_cost": 2.0}


class Scorer:
    catastrophe_threshold = 1.0

    def __call__(self, prompts, responses):
        return {
            "reward": [float(len(r)) for r in responses],
            "cost": [float(r.count("e")) for r in responses],
        }
"""


def _with_eval(path, tmp_path, evaluation):
    with open(path) as f:
        doc = yaml.safe_load(f)
    doc["eval"] = evaluation
    return _write(tmp_path / "with_eval.yaml", doc)


@pytest.mark.slow  # the module's sequential sweep
def test_eval_hook_joins_the_table_and_is_cached(sequential, tmp_path, monkeypatch):
    path, sweep, _, _ = sequential
    (tmp_path / "sweep_fake_eval.py").write_text(_FAKE_EVAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import sweep_fake_eval

    with_eval = _with_eval(path, tmp_path, {"fn": "sweep_fake_eval:evaluate", "scale": 10.0})
    results = run_sweep(load_sweep(with_eval))
    assert {r["status"] for r in results["variants"]} == {"skipped"}
    for r, v in zip(results["variants"], sweep.variants, strict=True):
        assert r["eval"] == {"cost_mean": 10.0 * v.config.stages[1].beta, "worst_prompt_cost": 2.0}
    with open(os.path.join(sweep.run_dir, "results.md")) as f:
        assert "eval cost_mean" in f.read()
    assert len(sweep_fake_eval.CALLS) == len(sweep.variants)
    run_sweep(load_sweep(with_eval))  # same options: eval.json reused
    assert len(sweep_fake_eval.CALLS) == len(sweep.variants)


@pytest.mark.slow  # compiles the sampler and the teacher-forced log-probabilities
def test_builtin_eval_samples_and_scores_each_variant(sequential, tmp_path, monkeypatch):
    path, sweep, _, _ = sequential
    (tmp_path / "sweep_fake_eval.py").write_text(_FAKE_EVAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("q1 bread safe\nq2 story kind\nq3 help\n")
    evaluation = {
        "scorer": "sweep_fake_eval:Scorer",
        "prompts": str(prompts),
        "samples": 2,
        "max_new_tokens": 4,
        "n_boot": 20,
        "reference": sweep.variants[0].run_dir,
    }
    results = run_sweep(load_sweep(_with_eval(path, tmp_path, evaluation)))
    for r in results["variants"]:
        assert {"reward_mean", "cost_mean", "kl"} <= set(r["eval"]), r["eval"]
        assert all(np.isfinite(x) for x in r["eval"].values())
    with open(os.path.join(sweep.variants[1].run_dir, "eval.json")) as f:
        saved = json.load(f)["metrics"]["cost_mean"]
    assert saved["low"] <= saved["value"] <= saved["high"]
    # Every sample's text and scores beside eval.json (issue 25, item 6).
    from rsa_jax.eval import read_samples

    for v in sweep.variants:
        rows = read_samples(v.run_dir)
        assert len(rows) == 3 * 2 and {r["model"] for r in rows} == {v.name}
        assert {r["prompt"] for r in rows} == {"q1 bread safe", "q2 story kind", "q3 help"}
