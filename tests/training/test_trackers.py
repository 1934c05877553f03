"""`train.report_to: [tensorboard, wandb, mlflow]` for real, without a network: a tiny run logs
to W&B in offline mode (its local run file read back record by record) and to MLflow (a SQLite
store, and the file store), and every logged value, the held-out eval/* ones included, equals
the one in metrics.jsonl; the resolved config arrives as parameters. Skipped when the
`tracking` extra is not installed."""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest

from rsa_jax.cli import main
from rsa_jax.config import ConfigError, load_config
from rsa_jax.data import write_toy_data
from rsa_jax.training import log_artifacts
from rsa_jax.training._trackers import open_trackers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def wandb_history(run_file: str) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the history records of an offline W&B run file: a LevelDB log
    (32 KiB blocks of records with a 7-byte header: crc, length, type) after a 7-byte file header
    (':W&B', magic, version) holding wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(run_file, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(pending)
            pending = b""
    history: dict[int, dict[str, float]] = {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
        }
        step = int(items["_step"])
        history[step] = {**history.get(step, {}), **items}
    return history


def _train(tmp_path, monkeypatch, report_to: str) -> tuple[str, list[dict]]:
    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=24)
    run = str(tmp_path / "run")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [f"data.path={data}", f"train.run_dir={run}", "stages.0.steps=2"]
    overrides += ["stages.1.steps=1", "checkpoint.async_save=false", "checkpoint.every=0"]
    overrides += [f"train.report_to={report_to}", "data.eval_fraction=0.25", "train.eval_every=2"]
    assert main(["train", TINY, *overrides]) == 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # training records at global steps 1, 2, 3; held-out eval/* records at 2 (stage 0's end)
    # and 3 (stage 1's end)
    assert [(r["global_step"], "eval/loss" in r) for r in records] == [
        (1, False),
        (2, False),
        (2, True),
        (3, False),
        (3, True),
    ]
    return run, records


def _floats(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, float)}


@pytest.mark.slow  # imports wandb and mlflow and trains (20 s); the JSONL-only path runs by default
def test_wandb_offline_and_mlflow_sqlite_hold_the_metrics_of_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, records = _train(tmp_path, monkeypatch, "[tensorboard,wandb,mlflow]")
    # W&B: the offline run file, one history record per logged step.
    [run_file] = glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb"))
    history = wandb_history(run_file)
    assert sorted(history) == [1, 2, 3]
    for record in records:
        logged = history[record["global_step"]]
        for key, value in _floats(record).items():
            assert logged[key] == pytest.approx(value, rel=1e-12, abs=0), key
    # MLflow: the default SQLite store in the run directory; params are the resolved config.
    client = MlflowClient(f"sqlite:///{os.path.join(run, 'mlflow.db')}")
    with open(os.path.join(run, "mlflow_run_id")) as f:
        run_id = f.read().strip()
    for key in {k for r in records for k in _floats(r)}:
        got = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        want = {r["global_step"]: r[key] for r in records if key in r}
        assert got == pytest.approx(want, rel=1e-12, abs=0), key
    params = client.get_run(run_id).data.params
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    assert params["stages.1.beta"] == str(saved["stages"][1]["beta"])
    assert params["data.view"] == "auto" and params["train.run_dir"] == saved["train"]["run_dir"]
    assert client.get_run(run_id).info.status == "FINISHED"
    # TensorBoard's event files are still written.
    assert glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))


def test_mlflow_file_store_and_report_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    run.mkdir()
    [tracker] = open_trackers(["mlflow"], str(run), {"a.b": 1})
    for step, value in [(1, 0.5), (2, 0.25)]:
        tracker.log({"loss": value}, step)
    tracker.close()
    client = MlflowClient(f"file:{store}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 0.5),
        (2, 0.25),
    ]
    # A resumed run continues the same MLflow run.
    [again] = open_trackers(["mlflow"], str(run), {"a.b": 1})
    again.log({"loss": 0.125}, 3)
    again.close()
    assert len(client.get_metric_history(run_id, "loss")) == 3
    # A sweep's or demo's report files become artifacts of its own tracker run.
    report = tmp_path / "frontier.md"
    report.write_text("| method | reward |\n")
    log_artifacts(["tensorboard", "mlflow"], str(run), [str(report)], folder="frontier")
    files = [a.path for a in client.list_artifacts(run_id, "frontier")]
    assert files == ["frontier/frontier.md"]


def test_report_to_names_unknown_trackers_and_missing_extras(monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to: unknown \\['neptune'\\]"):
        load_config(TINY, ["train.report_to=[tensorboard,neptune]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"wandb is not installed; pip install -e '.\[tracking\]'"):
        open_trackers(["wandb"], "/nonexistent", {})
