"""What a user reads while training: stage summaries once (printed, or logged under -v), every
line of a sweep variant named, and compilation kept out of the first step's throughput."""

from __future__ import annotations

import json
import logging
import os

from rsa_jax.sweep._run import variant_log_lines
from rsa_jax.training._logging import MetricsLog


def _one_stage(tmp_path, label=None):
    os.makedirs(tmp_path, exist_ok=True)
    log = MetricsLog(str(tmp_path), progress=False, label=label)
    log.start_stage(0, "helpfulness", 2, 0)
    for step in (1, 2):
        log.log(0, step, step, {"loss": 0.5, "grad_norm": 1.0}, 10.0, 2, 0.5)
    log.end_stage()
    log.close()


def test_stage_summary_is_printed_once_without_and_logged_once_with_verbose(
    tmp_path, capsys, caplog
):
    with caplog.at_level(logging.WARNING, logger="rsa_jax"):
        _one_stage(tmp_path / "quiet")
    out = capsys.readouterr().out
    assert out.count("stage 0 (helpfulness) summary: loss 0.5000") == 1
    with caplog.at_level(logging.INFO, logger="rsa_jax"):
        _one_stage(tmp_path / "verbose")
    assert capsys.readouterr().out == ""
    lines = [r.getMessage() for r in caplog.records if "summary" in r.getMessage()]
    assert lines == ["stage 0 (helpfulness) summary: loss 0.5000"]


def test_a_sweep_variant_names_itself_on_every_line(tmp_path, capsys):
    _one_stage(tmp_path, label="a__beta-0.1")
    assert capsys.readouterr().out.startswith("[a__beta-0.1] stage 0 (helpfulness) summary")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    root, keep = logging.getLogger(), Keep()
    root.addHandler(keep)
    try:
        with variant_log_lines("b__mu-0.9"):
            logging.getLogger("rsa_jax.training").warning("stage %r data: %s", "s", "ok")
        logging.getLogger("rsa_jax.training").warning("after the variant")
    finally:
        root.removeHandler(keep)
    assert records == ["[b__mu-0.9] stage 's' data: ok", "after the variant"]


def test_first_logged_step_keeps_compilation_out_of_its_throughput(tmp_path):
    from rsa_jax.config import load_config
    from rsa_jax.data import write_toy_data
    from rsa_jax.training import train
    from rsa_jax.training._engine import clear_step_cache

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=32)
    overrides = [
        f"data.path={data}",
        f"train.run_dir={tmp_path / 'run'}",
        "stages.0.steps=3",
        "stages.1.steps=1",
        "checkpoint.every=0",
    ]
    clear_step_cache()  # the first step compiles in this process
    train(load_config(os.path.join(root, "configs", "tiny.yaml"), overrides))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    first, later = records[0], records[1:3]
    assert first["step"] == 1 and first["compile_s"] > 0
    # The step time excludes the compile time, so the compile dwarfs it here.
    assert first["compile_s"] > first["step_time_s"]
    assert all("compile_s" not in r for r in later)
    assert all(r["tokens_per_s"] > 0 for r in records)
