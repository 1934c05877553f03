"""Sweeps under mistakes and faults (issue 25): checks before work (items 3, 5, 16: the scorer,
the prompt file, eval settings and a vmap risk grid fail at --dry-run and before the first
step), a risk grid's mu (item 5), equal grid values and a number as run_dir (item 16), exit 75
for preempted sweeps and one line for a full disk (item 16), a deleted stages/ (item 16)."""

from __future__ import annotations

import errno
import logging
import os
import signal

import pytest
import yaml

from rsa_jax import cli
from rsa_jax.cli import main
from rsa_jax.config import ConfigError, load_config
from rsa_jax.data import write_toy_data
from rsa_jax.losses import MU_DEFAULT, MU_DOMAIN, MU_MEANING, RISKS
from rsa_jax.sweep import SweepError, load_sweep, run_sequential, run_sweep
from rsa_jax.training import CheckpointWriteError, StopSignal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
RSA_CVAR = os.path.join(ROOT, "configs", "rsa_cvar.yaml")


@pytest.fixture
def data(tmp_path):
    path = str(tmp_path / "pairs.jsonl")
    write_toy_data(path, rows=16)
    return path


def _sweep(tmp_path, data, **doc) -> str:
    doc = {
        "base": TINY,
        "run_dir": str(tmp_path / "runs"),
        "overrides": [f"data.path={data}", *doc.pop("overrides", [])],
        **doc,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# ------------------------------------------------------------- checks before work (3, 5, 16)


@pytest.mark.parametrize(
    "evaluation, words",
    [
        (
            {"scorer": "nosuchmod:scorer", "prompts": "PROMPTS"},
            ["eval.scorer", "no module named 'nosuchmod'", "working directory"],
        ),
        ({"scorer": "rsa_jax.tasks:OracleScorer", "prompts": "/nope.jsonl"}, ["eval.prompts"]),
        ({"task": "safty"}, ["eval.task", "'safty'"]),
        ({"task": "safety", "samples": 0}, ["eval.samples", ">= 1"]),
        ({"task": "safety", "reference": "/no/such/model"}, ["eval.reference"]),
        ({"task": "safety", "sample": 4}, ["unknown option(s) ['sample']"]),
        ({"fn": "nosuchmod:evaluate"}, ["eval.fn", "nosuchmod"]),
    ],
)
def test_eval_settings_fail_the_dry_run_and_the_sweep_before_training(
    tmp_path, data, capsys, evaluation, words
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    evaluation = {k: str(prompts) if v == "PROMPTS" else v for k, v in evaluation.items()}
    path = _sweep(tmp_path, data, grid={"stages.1.beta": [0.1, 0.05]}, eval=evaluation)
    assert main(["sweep", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err, err
    for w in words:
        assert w in err, (w, err)
    with pytest.raises(SweepError) as info:
        run_sweep(load_sweep(path))  # fails before anything trains
    assert all(w in str(info.value) for w in words)
    assert not os.path.exists(tmp_path / "runs" / "s1.beta-0.1")


def test_a_good_scorer_and_prompt_file_pass_the_dry_run(tmp_path, data, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    evaluation = {"scorer": "rsa_jax.tasks:OracleScorer", "prompts": str(prompts)}
    path = _sweep(tmp_path, data, grid={"stages.1.beta": [0.1, 0.05]}, eval=evaluation)
    assert main(["sweep", path, "--dry-run"]) == 0
    assert "2 variant(s)" in capsys.readouterr().out


def test_missing_data_fails_the_dry_run(tmp_path, data, capsys):
    path = _sweep(
        tmp_path, data, overrides=["data.path=/no/such.jsonl"], grid={"stages.1.beta": [0.1]}
    )
    assert main(["sweep", path, "--dry-run"]) == 2
    assert "data.path '/no/such.jsonl' does not exist" in capsys.readouterr().err


def test_a_risk_grid_takes_each_risks_own_mu(tmp_path, data):
    """mu is a CVaR level for cvar/cvar_reference and a coefficient for erm: a grid that
    switches the risk without giving mu gets the risk's default, in the variant's overrides."""
    path = _sweep(
        tmp_path,
        data,
        base=RSA_CVAR,
        grid={"stages.1.risk": ["cvar_reference", "erm", "kl", "cvar"]},
    )
    variants = {v.config.stages[1].risk: v for v in load_sweep(path).variants}
    assert variants["erm"].config.stages[1].mu == MU_DEFAULT["erm"] == 5.0
    assert "stages.1.mu=5.0" in variants["erm"].overrides
    for risk in ("cvar_reference", "cvar", "kl"):  # same meaning, or mu unused: the base's
        assert variants[risk].config.stages[1].mu == 0.95
        assert not any(o.startswith("stages.1.mu") for o in variants[risk].overrides)
    # A mu given with the risk is the user's.
    path = _sweep(
        tmp_path,
        data,
        base=RSA_CVAR,
        variants=[{"name": "erm2", "overrides": ["stages.1.risk=erm", "stages.1.mu=2.0"]}],
    )
    assert load_sweep(path).variants[0].config.stages[1].mu == 2.0


def test_every_risk_declares_what_mu_means():
    assert set(MU_MEANING) == set(MU_DEFAULT) == set(MU_DOMAIN) == set(RISKS)
    for risk, mu in MU_DEFAULT.items():
        assert (mu is None) == (MU_MEANING[risk] is None)
        if mu is not None:
            lower, upper = MU_DOMAIN[risk]
            assert lower < mu <= upper


def test_equal_grid_values_are_refused(tmp_path, data):
    path = _sweep(tmp_path, data, grid={"stages.1.beta": [1, 1.0]})
    with pytest.raises(SweepError, match="'s1.beta-1' and 's1.beta-1.0' have the same config"):
        load_sweep(path)
    twins = [
        {"name": "a", "overrides": ["stages.1.beta=0.1"]},
        {"name": "b", "overrides": ["stages.1.beta=1.0e-1"]},
    ]
    path = _sweep(tmp_path, data, variants=twins)
    with pytest.raises(SweepError, match="'a' and 'b' have the same config"):
        load_sweep(path)


def test_a_sweep_into_object_storage_is_refused_with_the_reason(tmp_path, data):
    path = _sweep(tmp_path, data, grid={"stages.1.beta": [0.1]})
    with pytest.raises(SweepError, match="gs://b/s: sweeps write local directories only"):
        load_sweep(path, run_dir="gs://b/s")
    assert not (tmp_path / "gs:").exists()


def test_a_number_is_not_a_run_dir(tmp_path, data):
    path = _sweep(tmp_path, data, grid={"stages.1.beta": [0.1]})
    doc = yaml.safe_load(open(path))
    doc["run_dir"] = 5
    open(path, "w").write(yaml.safe_dump(doc))
    with pytest.raises(SweepError, match=r"run_dir must be a directory path \(text\), got 5"):
        load_sweep(path)
    config = tmp_path / "train.yaml"
    config.write_text("train:\n  run_dir: 5\n")
    with pytest.raises(ConfigError, match=r"train.run_dir: expected text, got int 5"):
        load_config(str(config))
    config.write_text("train:\n  run_dir: '5'\n")
    assert load_config(str(config)).train.run_dir == "5"  # quoted: the user's text


# ----------------------------------------------------------------------- exit codes (16)


def test_a_preempted_sequential_sweep_stops_before_the_next_variant(tmp_path, data):
    sweep = load_sweep(_sweep(tmp_path, data, grid={"stages.1.beta": [0.1, 0.05]}))
    status = run_sequential(sweep, stop=StopSignal(["SIGTERM"]))
    assert status == {sweep.variants[0].name: "preempted"}
    assert not os.path.exists(sweep.variants[0].run_dir)


def test_the_cli_exits_75_for_a_preempted_sweep(tmp_path, data, monkeypatch):
    import rsa_jax.sweep as sweep_module

    monkeypatch.setattr(
        sweep_module, "run_sweep", lambda sweep, stop: {"status": {"a": "preempted"}}
    )
    path = _sweep(tmp_path, data, grid={"stages.1.beta": [0.1]})
    assert main(["sweep", path]) == 75


def _full_disk(args):
    """What Orbax does on ENOSPC: ERROR records with tracebacks from its threads, then the
    main thread's CheckpointWriteError."""
    try:
        raise ValueError("RESOURCE_EXHAUSTED: Failed to write 675217 bytes: No space left")
    except ValueError:
        logging.getLogger("absl").exception("background save thread failed")
    raise CheckpointWriteError(
        errno.ENOSPC, "cannot save checkpoint step 2 in run/checkpoints: the disk is full"
    )


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_full_disk_is_one_line_without_v_and_tracebacks_with_it(
    tmp_path, capsys, caplog, monkeypatch, command
):
    monkeypatch.setattr(cli, f"_cmd_{command}", _full_disk)
    file = tmp_path / "x.yaml"
    file.write_text("{}\n")
    try:
        assert main([command, str(file)]) == 1
        err = capsys.readouterr().err
        assert err == (
            f"rsa-jax {command}: error: [Errno 28] cannot save checkpoint step 2 in "
            "run/checkpoints: the disk is full\n"
        )
        assert not [r for r in caplog.records if r.name == "absl"]
        assert main(["-v", command, str(file)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and err.endswith("the disk is full\n")
        assert [r.exc_info for r in caplog.records if r.name == "absl"]  # Orbax's, under -v
    finally:
        logging.getLogger("absl").setLevel(logging.WARNING)


# ------------------------------------------------------ real signals (slow: tiny training)


def _sigterm_after_first_record(monkeypatch):
    from rsa_jax.training._logging import MetricsLog

    log = MetricsLog.log

    def log_then_signal(self, *args, **kwargs):
        log(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "log", log_then_signal)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "vmap"])
def test_sigterm_ends_a_sweep_with_75_and_a_message(tmp_path, data, capsys, monkeypatch, mode):
    path = _sweep(
        tmp_path,
        data,
        overrides=["stages.0.steps=2", "stages.1.steps=1", "checkpoint.every=0"],
        grid={"stages.1.beta": [0.1, 0.05]},
    )
    _sigterm_after_first_record(monkeypatch)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["sweep", path, "--mode", mode]) == 75
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = capsys.readouterr().out
    assert "sweep interrupted; rerun the same command to resume" in out
    first = os.path.join(tmp_path, "runs", "s1.beta-0.1")
    if mode == "sequential":  # saved at the step it stopped
        assert os.listdir(os.path.join(first, "checkpoints"))
    else:
        assert "vmap: stopped by SIGTERM at stage 0 step 1" in out
        assert "a rerun trains the 2 unfinished variant(s) afresh" in out


# ------------------------------------------------------------------ a deleted stages/ (16)


@pytest.mark.parametrize(
    "meta, words",
    [
        (None, "stage 0 has not finished"),
        ({"stage": 0, "done": False}, "stage 0 has not finished"),
        ({"stage": 0, "done": True}, "rerun the run's train command to restore it"),
        ({"stage": 1, "done": True}, "only retraining stage 0"),
    ],
)
def test_a_missing_stage_copy_says_why(tmp_path, meta, words):
    from rsa_jax.training import CheckpointMeta, RunDir, _trainer

    newest = CheckpointMeta(
        **{"stage": 0, "done": False, **(meta or {})}, stage_step=3, rng=[0], config={}
    )
    path = str(tmp_path / "stages" / "0")
    message = _trainer._missing_stage(RunDir(str(tmp_path)), newest, 0, path)
    assert words in message and path in message
    if meta is not None and meta["done"]:
        assert "finished, but the copy of its policy" in message and "missing" in message
