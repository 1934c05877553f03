"""Run-directory units: the exclusive lock (a second process is refused at once, a killed holder
leaves nothing stale), the resume config comparison, and absolute model/data paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from rsa_jax.config import ConfigError, from_json, load_config, to_json
from rsa_jax.training._rundir import (
    ConfigMismatch,
    RunDirError,
    RunLock,
    absolute_paths,
    check_resume,
    config_diff,
    lock_run_dir,
    saved_config,
    write_config,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

HOLDER = """
import sys, time
from rsa_jax.training._rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""

TRY = """
import sys
from rsa_jax.training._rundir import RunDirError, RunLock
try:
    RunLock(sys.argv[1]).acquire()
except RunDirError as e:
    print(e)
    sys.exit(3)
print("acquired")
"""


def python(code: str, *args: str, **kwargs):
    return [sys.executable, "-c", code, *args]


@pytest.fixture
def holder(tmp_path):
    """A second Python process holding the lock on tmp_path/run."""
    run = tmp_path / "run"
    proc = subprocess.Popen(python(HOLDER, str(run)), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_trainer_is_refused_at_once_naming_the_holder(holder):
    run, proc = holder
    start = time.monotonic()
    done = subprocess.run(python(TRY, str(run)), cwd=ROOT, capture_output=True, text=True)
    assert time.monotonic() - start < 30  # the python start-up; the lock itself does not wait
    assert done.returncode == 3, done.stderr
    message = done.stdout
    assert f"pid {proc.pid} on host {os.uname().nodename}" in message
    assert "started 20" in message and str(run) in message
    assert "another train.run_dir" in message
    with pytest.raises(RunDirError, match=f"pid {proc.pid}"):  # also within one process
        RunLock(str(run)).acquire()


def test_a_killed_holder_leaves_no_stale_lock(holder):
    run, proc = holder
    proc.kill()  # SIGKILL: no clean-up code runs
    proc.wait()
    assert os.path.getsize(run / ".lock") > 0  # its record is still there ...
    with RunLock(str(run)) as lock:  # ... but the kernel released the lock
        assert lock.held
        info = json.loads((run / ".lock").read_text())
        assert info["pid"] == os.getpid()
    assert (run / ".lock").read_text() == ""  # released: nobody named


def test_lock_is_reentrant_per_object_and_disabled_is_a_no_op(tmp_path):
    lock = RunLock(str(tmp_path / "run"))
    lock.acquire()
    lock.acquire()  # the same object: still one lock
    RunLock(str(tmp_path / "run"), enabled=False).acquire()  # process > 0: takes nothing
    with pytest.raises(RunDirError):
        RunLock(str(tmp_path / "run")).acquire()
    lock.release()
    RunLock(str(tmp_path / "run")).acquire().release()


def test_an_unwritable_run_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match=r"cannot use run directory .*file/run.*train.run_dir"):
        RunLock(str(blocker / "run")).acquire()


def test_lock_run_dir_takes_the_lock_in_process_zero(tmp_path, holder):
    lock = lock_run_dir(str(tmp_path / "mine"))
    assert lock.held
    lock.release()
    run, proc = holder
    with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
        lock_run_dir(str(run))


# ------------------------------------------------------------------------------ config diff


def config_dict(*overrides):
    return json.loads(to_json(load_config(TINY, list(overrides))))


def test_identical_configs_and_ignored_keys_do_not_differ():
    saved = config_dict("train.run_dir=runs/a")
    new = config_dict(
        "train.run_dir=/elsewhere/b",
        "train.log_every=7",
        "train.progress_bar=false",
        "checkpoint.async_save=false",
        "checkpoint.every=3",
        "mesh.data=2",
        "model.remat=false",
        "optim.microbatches=2",
        "data.path=/moved/pairs.jsonl",
    )
    assert config_diff(saved, saved) == []
    assert config_diff(saved, new) == []


def test_changed_training_keys_are_listed():
    saved = config_dict()
    new = config_dict(
        "optim.learning_rate=3e-3", "train.seed=5", "stages.1.steps=9", "data.batch_size=8"
    )
    assert config_diff(saved, new) == [
        "data.batch_size", "optim.learning_rate", "stages.1.steps", "train.seed",
    ]  # fmt: skip


def test_other_shapes_and_fewer_stages_are_listed():
    saved = config_dict()
    assert config_diff(saved, config_dict("model.scan_layers=true")) == ["model.scan_layers"]
    one_stage = dict(saved, stages=saved["stages"][:1])
    keys = config_diff(saved, one_stage)
    assert keys and all(k.startswith("stages.1.") for k in keys)
    assert "stages.1.beta" in keys


def test_check_resume_refuses_with_the_keys_and_both_ways_out(tmp_path):
    run = tmp_path / "run"
    assert check_resume(str(run), config_dict()) == []  # a new run
    run.mkdir()
    (run / "config.json").write_text(to_json(load_config(TINY)))
    assert check_resume(str(run), config_dict("train.log_every=5")) == []
    new = config_dict("optim.learning_rate=3e-3")
    with pytest.raises(ConfigMismatch) as info:
        check_resume(str(run), new)
    message = str(info.value)
    assert "1 key(s) differ" in message and "optim.learning_rate: 0.001 -> 0.003" in message
    assert f"delete {run}" in message and "another train.run_dir" in message
    assert "train.resume=force" in message
    assert isinstance(info.value, ConfigError)  # the CLI's one-line error, exit code 2
    assert check_resume(str(run), new, force=True) == ["optim.learning_rate"]


def test_write_config_replaces_the_file_whole(tmp_path):
    write_config(str(tmp_path), '{"a": 1}')
    write_config(str(tmp_path), '{"a": 2}')
    assert saved_config(str(tmp_path)) == {"a": 2}
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left


def test_a_malformed_config_json_names_the_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model": {\n    "path": tiny\n}')
    with pytest.raises(RunDirError, match=r"config.json: not valid JSON \(line 3"):
        saved_config(str(tmp_path))


# ------------------------------------------------------------------------------ paths


def test_paths_become_absolute_and_survive_a_change_of_directory(tmp_path, monkeypatch):
    model = tmp_path / "models" / "sft"
    model.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = load_config(
        TINY,
        ["model.path=models/sft", "data.path=data/pairs.jsonl", "stages.1.data_path=s2.jsonl"],
        check=False,
    )
    fixed = absolute_paths(config)
    assert fixed.model.path == str(model)
    assert fixed.data.path == str(tmp_path / "data" / "pairs.jsonl")
    assert fixed.stages[1].data_path == str(tmp_path / "s2.jsonl")
    assert fixed.stages[0].data_path == ""  # empty: the stage uses data.path
    monkeypatch.chdir(HERE)
    stored = from_json(to_json(fixed))  # what `rsa-jax eval RUN` reads back elsewhere
    assert os.path.isdir(stored.model.path) and stored.data.path == fixed.data.path


def test_tiny_model_stays_tiny():
    assert absolute_paths(load_config(TINY)).model.path == "tiny"


def test_a_missing_local_model_path_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"model.path: {tmp_path}/no/such/model does not exist"):
        absolute_paths(load_config(TINY, ["model.path=no/such/model"], check=False))
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        absolute_paths(load_config(TINY, ["model.path=weights.bin"], check=False))
