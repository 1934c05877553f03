"""Atomic appends and located errors (issue 25, item 15): a torn last line of metrics.jsonl is
cut off on resume and skipped by readers, other bad lines are named by file and line; a torn
eval.json cache is recomputed; a damaged config.json, safetensors file or Parquet string cell
gives an error naming the file (and row and field)."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from rsa_jax.config import Config, TrainConfig, to_json
from rsa_jax.data import DataConfig, DataError, load_pairs
from rsa_jax.models import Llama, LlamaConfig, load_hf, save_hf, tiny_config
from rsa_jax.sweep import Variant
from rsa_jax.sweep._eval import cached_evaluation
from rsa_jax.sweep._results import last_records
from rsa_jax.training import read_metrics
from rsa_jax.training._logging import MetricsLog

RECORD = {"stage": 0, "step": 1, "global_step": 1, "loss": 0.5}


def _constant_model(value: float = 0.01) -> Llama:
    """A tiny Llama with every weight `value`: built from shapes, without the seconds of
    random initialisation (one compile per parameter on a loaded machine)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(tiny_config(), rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.full(s.shape, value, s.dtype), state))


def _line(**changes) -> str:
    return json.dumps({**RECORD, **changes}) + "\n"


def test_resume_cuts_a_torn_last_line_and_appends_cleanly(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    torn = _line(step=2)[:25]  # killed in the middle of the second record
    path.write_text(_line(step=1) + torn)
    with caplog.at_level(logging.WARNING):
        log = MetricsLog(str(tmp_path), progress=False)
    assert f"{path}: dropped 1 torn last line ({len(torn)} bytes, line 2)" in caplog.text
    log.log(0, 2, 2, {"loss": 0.25}, tokens=10.0, pairs=2, seconds=1.0)
    log.close()
    records = read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] == 0.25


def test_readers_skip_a_torn_tail_and_name_a_bad_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_line(step=1) + _line(step=2, loss=0.1) + '{"stage": 0, "st')
    with caplog.at_level(logging.WARNING):
        assert last_records(str(tmp_path))[0]["loss"] == 0.1
    assert f"{path}:3: skipped 1 torn last line" in caplog.text
    # What an old resume left: the torn line glued onto the next record, mid-file.
    path.write_text(_line(step=1) + '{"stage": 0, "st' + _line(step=2) + _line(step=3))
    with pytest.raises(ValueError, match=rf"^{path}:2: not a JSON record"):
        last_records(str(tmp_path))


def _variant(tmp_path) -> Variant:
    run_dir = tmp_path / "v"
    run_dir.mkdir()
    config = Config(train=TrainConfig(run_dir=str(run_dir)))
    return Variant("v", (), config)


def test_a_torn_eval_cache_is_recomputed(tmp_path, caplog):
    variant = _variant(tmp_path)
    calls = []

    def evaluate(options, v):
        calls.append(v.name)
        return {"reward_mean": 1.5}

    options = {"task": "safety"}
    assert cached_evaluation(options, variant, evaluate) == {"reward_mean": 1.5}
    assert cached_evaluation(options, variant, evaluate) == {"reward_mean": 1.5}
    assert calls == ["v"]  # the second read the cache
    cache = os.path.join(variant.run_dir, "eval.json")
    text = open(cache).read()
    with open(cache, "w") as f:
        f.write(text[: len(text) // 2])
    with caplog.at_level(logging.WARNING):
        assert cached_evaluation(options, variant, evaluate) == {"reward_mean": 1.5}
    assert calls == ["v", "v"] and f"{cache}: unreadable" in caplog.text
    assert json.load(open(cache))["metrics"] == {"reward_mean": 1.5}
    assert not [n for n in os.listdir(variant.run_dir) if ".tmp" in n]


def test_a_corrupt_run_config_names_the_file(tmp_path):
    from rsa_jax.training import RunDirError
    from rsa_jax.training._rundir import saved_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = to_json(Config(train=TrainConfig(run_dir=str(run_dir))))
    (run_dir / "config.json").write_text(text[:100])
    with pytest.raises(RunDirError, match=rf"{run_dir / 'config.json'}: not valid JSON \(line"):
        saved_config(str(run_dir))


def test_a_corrupt_model_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'}: not JSON"):
        LlamaConfig.from_dir(str(tmp_path))


def test_a_truncated_safetensors_file_names_the_file_and_tensor(tmp_path):
    model = _constant_model()
    single = tmp_path / "single"
    save_hf(model, str(single))
    weights = single / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"^{weights}: not a readable safetensors file"):
        load_hf(str(single))
    sharded = tmp_path / "sharded"
    save_hf(model, str(sharded), max_shard_size=len(data) // 3)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].write_bytes(shards[1].read_bytes()[:-64])  # header intact, data short
    with pytest.raises(ValueError, match=rf"^{shards[1]}: "):
        load_hf(str(sharded))


def _bad_utf8_parquet(path) -> None:
    rows = 3
    text = [b"fine", b"bad \xff\xfe", b"also fine"]
    offsets = np.cumsum([0] + [len(t) for t in text]).astype(np.int32)
    column = pa.Array.from_buffers(
        pa.string(), rows, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(text))]
    )
    table = pa.table(
        {
            "prompt": ["p1", "p2", "p3"],
            "chosen": column,
            "rejected": ["r1", "r2", "r3"],
        }
    )
    pq.write_table(table, str(path))


def test_non_utf8_in_a_parquet_string_column_names_row_and_field(tmp_path):
    path = tmp_path / "pairs.parquet"
    _bad_utf8_parquet(path)
    config = DataConfig(path=str(path), view="pairs")
    with pytest.raises(DataError, match=rf"^{path}:2: field 'chosen': not valid UTF-8"):
        load_pairs(config)
    pairs, report = load_pairs(DataConfig(path=str(path), view="pairs", on_error="skip"))
    assert [p.chosen for p in pairs] == ["fine", "also fine"]
    assert report.rows_read == 3 and sum(report.skipped.values()) == 1
    assert "chosen: not valid UTF-8" in report.summary()


def test_unknown_format_lists_the_formats(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="set data.format to one of jsonl, parquet, arrow_dir"):
        load_pairs(DataConfig(path=str(path), view="pairs"))


def test_a_wrong_data_path_fails_before_any_work_and_makes_no_run_dir(
    tmp_path, capsys, monkeypatch
):
    """Issue 25, item 8: before the model loads (no seconds of start-up), exit 2 like a sweep,
    and no run directory left behind to block the corrected rerun."""
    from rsa_jax.cli import main
    from rsa_jax.training import _trainer

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine (tokenizer, model) was built before the data check")

    monkeypatch.setattr(_trainer, "Engine", no_engine)

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_dir = tmp_path / "run"
    missing = tmp_path / "nope.jsonl"
    code = main(
        [
            "train",
            os.path.join(root, "configs", "tiny.yaml"),
            f"data.path={missing}",
            f"train.run_dir={run_dir}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"rsa-jax train: config error: data.path: '{missing}' does not exist\n"
    assert not run_dir.exists()


def test_an_override_typo_gets_did_you_mean():
    from rsa_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"Did you mean: 'optim\.learning_rate'\?"):
        load_config(None, ["optim.learnin_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"Did you mean: 'stages\.0\.beta'\?"):
        load_config(None, ["stages.0.bta=0.1"])
