"""Whole-file faults (unreadable Parquet/Arrow, bad state.json), a BOM, and files with no pairs."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rsa_jax.data import DataConfig, DataError, load_pairs

ROWS = [
    {
        "prompt": f"question {i}",
        "response_0": f"answer A{i}",
        "response_1": f"answer B{i}",
        "better_response_id": i % 2,
        "safer_response_id": None,
    }
    for i in range(5)
]


def _arrow_dir(path, rows=ROWS):
    os.makedirs(path)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(os.path.join(path, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}, f)
    return str(path)


def _parquet(path, rows=ROWS):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _truncate(path):
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"PAR1 this is not a parquet file at all \x00\x01\x02" * 7)


def _bad_files(tmp_path):
    """(name, data.path, the file the error must name, a fragment of the problem)."""
    cases = []
    p = _parquet(tmp_path / "trunc.parquet")
    _truncate(p)
    cases.append(("truncated parquet", p, p, "unreadable"))
    p = str(tmp_path / "garbage.parquet")
    _garbage(p)
    cases.append(("garbage parquet", p, p, "unreadable"))
    p = str(tmp_path / "empty.parquet")
    open(p, "wb").close()
    cases.append(("empty parquet", p, p, "unreadable"))
    d = _arrow_dir(tmp_path / "badstate")
    with open(os.path.join(d, "state.json"), "w") as f:
        f.write('{"_data_files": [{"filename": ')
    cases.append(("malformed state.json", d, os.path.join(d, "state.json"), "malformed JSON"))
    d = _arrow_dir(tmp_path / "nofiles")
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump({"_data_files": [{"name": "x"}]}, f)
    cases.append(("entry without filename", d, os.path.join(d, "state.json"), "filename"))
    d = _arrow_dir(tmp_path / "missing")
    arrow = os.path.join(d, "data-00000-of-00001.arrow")
    os.remove(arrow)
    cases.append(("missing arrow file", d, arrow, "listed in state.json but missing"))
    d = _arrow_dir(tmp_path / "truncarrow")
    arrow = os.path.join(d, "data-00000-of-00001.arrow")
    _truncate(arrow)
    cases.append(("truncated arrow file", d, arrow, "unreadable"))
    d = _arrow_dir(tmp_path / "garbagearrow")
    arrow = os.path.join(d, "data-00000-of-00001.arrow")
    _garbage(arrow)
    cases.append(("garbage arrow file", d, arrow, "unreadable"))
    return cases


def test_unreadable_files_raise_data_error_naming_the_file(tmp_path):
    cases = _bad_files(tmp_path)
    for name, path, culprit, problem in cases:
        for on_error in ("raise", "skip"):  # a broken file is never a skippable row
            with pytest.raises(DataError) as info:
                load_pairs(DataConfig(path=path, on_error=on_error))
            message = str(info.value)
            assert info.value.path == culprit, name
            assert message.startswith(culprit) and problem in message, (name, message)
            assert "\n" not in message, name


def test_a_utf8_bom_at_the_start_is_accepted(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    bom_lines = tmp_path / "bom.jsonl"
    bom_lines.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    bom_array = tmp_path / "bom.json"
    bom_array.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    expected, _ = load_pairs(DataConfig(path=str(plain)))
    for path in (bom_lines, bom_array):
        pairs, report = load_pairs(DataConfig(path=str(path)))
        assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
            (p.prompt, p.chosen, p.rejected) for p in expected
        ]
        assert report.rows_read == len(ROWS) and not report.skipped
    # A BOM in the middle of a file is still a malformed line, named by its number.
    mid = tmp_path / "mid.jsonl"
    mid.write_bytes(plain.read_bytes() + b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    with pytest.raises(DataError) as info:
        load_pairs(DataConfig(path=str(mid)))
    assert info.value.line == len(ROWS) + 1


def test_no_pairs_left_names_the_file_and_what_was_left_out(tmp_path):
    path = _parquet(tmp_path / "d.parquet")
    # The safety view: every safer_response_id is null, so every row is dropped.
    with pytest.raises(DataError) as info:
        load_pairs(DataConfig(path=path, view="safety"))
    message = str(info.value)
    assert message.startswith(path) and "'safety'" in message
    assert f"read {len(ROWS)} rows, kept 0 pairs" in message
    assert f"null safer_response_id={len(ROWS)}" in message
    # on_error=skip that skips every row says what was skipped.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**r, "response_0": 7}) + "\n" for r in ROWS))
    with pytest.raises(DataError) as info:
        load_pairs(DataConfig(path=str(bad), on_error="skip"))
    assert str(bad) in str(
        info.value
    ) and f"expected a string or a list of messages, got int={len(ROWS)}" in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows") as info:
        load_pairs(DataConfig(path=str(empty)))
    assert info.value.path == str(empty)


def test_a_good_arrow_directory_still_reads(tmp_path):
    d = _arrow_dir(tmp_path / "ok")
    pairs, report = load_pairs(DataConfig(path=d))
    assert report.pairs_kept == len(pairs) == len(ROWS)
    shutil.rmtree(d)
