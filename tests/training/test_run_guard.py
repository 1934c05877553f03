"""One guard for everything that writes a run directory (issue 25, items 2, 10, 11, 14):
config.json appears only when a run has really started, the checkpoint's own config is what a
resume is compared with and what loading builds, a failed forced resume leaves config.json
alone, a vmap sweep locks its variants' run directories, and the "config differs" error says
everything on its one line."""

import json
import logging
import os

import pytest
import yaml

from rsa_jax.cli import EXIT_USAGE, main
from rsa_jax.config import load_config
from rsa_jax.data import write_toy_data
from rsa_jax.sweep import load_sweep, run_sweep
from rsa_jax.training import ConfigMismatch, RunDir, RunDirError, load_adapters, train
from rsa_jax.training._rundir import RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "pairs.jsonl")
    write_toy_data(path, rows=16)
    return path


def _args(data_path, run_dir, *more):
    return [
        f"data.path={data_path}",
        f"train.run_dir={run_dir}",
        "stages.0.steps=1",
        "stages.1.steps=1",
        "train.progress_bar=false",
        *more,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_path):
    """A run that failed before its first step, then the corrected command, run to the end."""
    run_dir = str(tmp_path_factory.mktemp("guard") / "run")
    with pytest.raises(ValueError, match="steps=500"):
        train(load_config(TINY, _args(data_path, run_dir, "stages.0.steps=500")))
    # Nothing that would block the corrected rerun (item 2): no config.json, no checkpoint.
    assert not RunDir(run_dir).has_config() and not RunDir(run_dir).has_checkpoints()
    result = train(load_config(TINY, _args(data_path, run_dir)))
    assert result.status == "done"
    return run_dir


def test_the_config_differs_error_shows_key_values_and_ways_out_without_v(
    finished, data_path, capsys
):
    code = main(["train", TINY, *_args(data_path, finished, "optim.learning_rate=3e-3")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_USAGE and len(lines) == 1, lines
    line = lines[0]
    assert "optim.learning_rate: 0.001 -> 0.003" in line
    assert "another train.run_dir" in line and "train.resume=force" in line


def test_resume_compares_the_checkpoint_config_not_config_json(finished, data_path):
    run = RunDir(finished)
    text = open(run.config_file).read()
    os.remove(run.config_file)  # deleted: the checkpoint still says what was trained (item 14)
    try:
        with pytest.raises(ConfigMismatch, match="stages.1.beta"):
            train(load_config(TINY, _args(data_path, finished, "stages.1.beta=0.5")))
        assert not run.has_config()  # a refused run writes nothing
    finally:
        run.write_config(text)


def test_a_failed_forced_resume_leaves_config_json_alone(finished, data_path):
    run = RunDir(finished)
    before = open(run.config_file).read()
    forced = _args(data_path, finished, "model.lora.rank=4", "train.resume=force")
    with pytest.raises(Exception):  # noqa: B017 - the checkpoint holds other arrays
        train(load_config(TINY, forced))
    assert open(run.config_file).read() == before  # item 11: the original command still works
    assert train(load_config(TINY, _args(data_path, finished))).status == "done"


def test_loading_uses_the_checkpoint_config_and_names_an_edited_config_json(finished, caplog):
    run = RunDir(finished)
    text = open(run.config_file).read()
    edited = json.loads(text)
    trained_beta = edited["stages"][1]["beta"]
    edited["stages"][1]["beta"] = trained_beta * 7
    run.write_config(json.dumps(edited))
    try:
        with caplog.at_level(logging.WARNING):
            engine, _ = load_adapters(finished)
        assert engine.config.stages[1].beta == trained_beta
        assert "config.json differs" in caplog.text and "stages.1.beta" in caplog.text
    finally:
        run.write_config(text)


def test_loading_a_run_being_trained_says_so(finished, caplog):
    with RunLock(finished), caplog.at_level(logging.WARNING):
        load_adapters(finished)
    assert "is being trained now" in caplog.text


def test_a_vmap_sweep_is_locked_out_of_variants_another_sweep_holds(tmp_path, data_path):
    doc = {
        "base": TINY,
        "mode": "vmap",
        "run_dir": str(tmp_path / "runs"),
        "overrides": _args(data_path, "unused")[:1] + ["stages.0.steps=1", "stages.1.steps=1"],
        "grid": {"stages.1.beta": [0.1, 0.05]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    sweep = load_sweep(str(path))
    held = sweep.variants[1].run_dir
    with RunLock(held), pytest.raises(RunDirError, match="in use by another trainer"):
        run_sweep(sweep)  # item 10: nothing trained, nothing written into the held variant
    assert not RunDir(held).has_checkpoints() and not RunDir(held).has_config()
    with RunLock(sweep.run_dir), pytest.raises(RunDirError, match="in use"):
        run_sweep(sweep)  # the sweep directory itself: one sweep at a time
