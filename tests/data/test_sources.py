"""Reading each format and schema, the stage views, and bad input."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rsa_jax.data import VIEWS, DataConfig, DataError, load_pairs

PKU_ROWS = [
    {
        "prompt": f"question {i}",
        "response_0": f"answer A{i}",
        "response_1": f"answer B{i}",
        "better_response_id": i % 2,
        "safer_response_id": 1 - i % 2,
        "is_response_0_safe": bool(i % 2),
        "is_response_1_safe": not bool(i % 2),
    }
    for i in range(6)
]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_arrow_dir(path, rows, shards=2):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files + state.json."""
    os.makedirs(path)
    names = []
    per = -(-len(rows) // shards)
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        table = pa.Table.from_pylist(rows[s * per : (s + 1) * per])
        with pa.OSFile(os.path.join(path, name), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        names.append({"filename": name})
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump({"_data_files": names, "_split": "train"}, f)
    with open(os.path.join(path, "dataset_info.json"), "w") as f:
        json.dump({"features": {}}, f)
    return str(path)


def write_json_array(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return str(path)


SUFFIX = {
    write_jsonl: "d.jsonl",
    write_json_array: "d.json",
    write_parquet: "d.parquet",
    write_arrow_dir: "d",
}


@pytest.mark.parametrize("writer", list(SUFFIX))
def test_every_format_reads_the_same_pairs(tmp_path, writer):
    suffix = SUFFIX[writer]
    path = writer(tmp_path / suffix, PKU_ROWS)
    pairs, report = load_pairs(DataConfig(path=path, view="helpfulness"))
    assert report.rows_read == 6 and report.pairs_kept == 6
    assert [p.prompt for p in pairs] == [f"question {i}" for i in range(6)]
    assert pairs[3].origin.endswith(":4")


@pytest.mark.parametrize("writer", [write_parquet, write_arrow_dir])
def test_chat_messages_survive_columnar_formats(tmp_path, writer):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"hi {i}"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": f"no {i}"}],
        }
        for i in range(3)
    ]
    pairs, _ = load_pairs(DataConfig(path=writer(tmp_path / SUFFIX[writer], rows), view="pairs"))
    assert [p.prompt for p in pairs] == [r["prompt"] for r in rows]
    assert [p.rejected for p in pairs] == [f"no {i}" for i in range(3)]


def test_dataset_dict_directory_names_its_splits(tmp_path):
    root = tmp_path / "pku"
    os.makedirs(root)
    write_arrow_dir(root / "train", PKU_ROWS)
    with open(root / "dataset_dict.json", "w") as f:
        json.dump({"splits": ["train", "test"]}, f)
    with pytest.raises(DataError, match="splits \\['train', 'test'\\].*pku/train"):
        load_pairs(DataConfig(path=str(root)))
    pairs, _ = load_pairs(DataConfig(path=str(root / "train")))
    assert len(pairs) == len(PKU_ROWS)


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]\n')
    with pytest.raises(DataError, match="malformed JSON") as info:
        load_pairs(DataConfig(path=str(path)))
    assert info.value.line == 3
    path.write_text(json.dumps([PKU_ROWS[0], {**PKU_ROWS[1], "safer_response_id": 7}]))
    with pytest.raises(DataError, match="must be 0 or 1") as info:
        load_pairs(DataConfig(path=str(path), view="safety"))
    assert info.value.line == 2 and info.value.field == "safer_response_id"


def test_views_pick_the_chosen_side(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PKU_ROWS)
    helpful, _ = load_pairs(DataConfig(path=path, view="helpfulness"))
    safe, _ = load_pairs(DataConfig(path=path, view="safety"))
    for i, (h, s) in enumerate(zip(helpful, safe, strict=True)):
        better = PKU_ROWS[i][f"response_{PKU_ROWS[i]['better_response_id']}"]
        safer = PKU_ROWS[i][f"response_{PKU_ROWS[i]['safer_response_id']}"]
        assert h.chosen == better and h.rejected != better
        assert s.chosen == safer and s.rejected != safer
    assert helpful[0].chosen != safe[0].chosen  # the two labels disagree on this data


def test_generic_schema_with_text_and_messages(tmp_path):
    rows = [
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
    ]
    pairs, report = load_pairs(
        DataConfig(path=write_jsonl(tmp_path / "p.jsonl", rows), view="pairs")
    )
    assert report.pairs_kept == 2
    assert pairs[1].prompt == rows[1]["prompt"]
    assert (pairs[1].chosen, pairs[1].rejected) == ("hello", "no")


def test_message_responses_take_the_last_assistant_turn(tmp_path):
    user = {"role": "user", "content": "hi"}
    rows = [
        {  # UltraFeedback style: the response lists repeat the user turn
            "prompt": "hi",
            "chosen": [user, {"role": "assistant", "content": "hello"}],
            "rejected": [user, {"role": "assistant", "content": "go away"}],
        },
        {"prompt": "hi", "chosen": [{"role": "assistant", "content": "same"}], "rejected": "same"},
        {"prompt": "hi", "chosen": [user], "rejected": "x"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match="must be the assistant's") as info:
        load_pairs(DataConfig(path=path, view="pairs"))
    assert info.value.line == 3 and info.value.field == "chosen[0]"
    pairs, report = load_pairs(DataConfig(path=path, view="pairs", on_error="skip"))
    assert [(p.chosen, p.rejected) for p in pairs] == [("hello", "go away")]
    assert report.dropped == {"identical responses": 1} and sum(report.skipped.values()) == 1


def test_non_preferences_are_dropped_and_counted(tmp_path):
    rows = [dict(PKU_ROWS[0]), dict(PKU_ROWS[1]), dict(PKU_ROWS[2])]
    rows[0]["response_1"] = rows[0]["response_0"]
    rows[1]["better_response_id"] = None
    pairs, report = load_pairs(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows)))
    assert len(pairs) == 1
    assert report.dropped == {"identical responses": 1, "null better_response_id": 1}
    assert "identical responses=1" in report.summary()


BAD_ROWS = [
    ("malformed JSON", b'{"prompt": "x", \n', None, "malformed JSON"),
    (
        "missing field",
        {k: v for k, v in PKU_ROWS[0].items() if k != "response_1"},
        "response_1",
        "missing field",
    ),
    (
        "id outside {0, 1}",
        {**PKU_ROWS[0], "better_response_id": 2},
        "better_response_id",
        "must be 0 or 1",
    ),
    (
        "bool id",
        {**PKU_ROWS[0], "better_response_id": True},
        "better_response_id",
        "must be 0 or 1",
    ),
    ("non-string text", {**PKU_ROWS[0], "response_0": 17}, "response_0", "expected a string"),
    ("empty prompt", {**PKU_ROWS[0], "prompt": "  "}, "prompt", "empty text"),
    ("non-UTF-8", b'{"prompt": "caf\xe9"}\n', None, "not valid UTF-8"),
    ("not an object", [1, 2], None, "expected a JSON object"),
]


def _write_with_bad_line(path, bad):
    with open(path, "wb") as f:
        f.write((json.dumps(PKU_ROWS[1]) + "\n").encode())
        f.write(bad if isinstance(bad, bytes) else (json.dumps(bad) + "\n").encode())
        f.write((json.dumps(PKU_ROWS[2]) + "\n").encode())
    return str(path)


@pytest.mark.parametrize(
    ("name", "bad", "field", "problem"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS]
)
def test_bad_input_names_file_line_and_field(tmp_path, name, bad, field, problem):
    path = _write_with_bad_line(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=problem) as info:
        load_pairs(DataConfig(path=path))
    assert info.value.path == path and info.value.line == 2 and info.value.field == field
    assert f"{path}:2" in str(info.value)
    # With on_error=skip the row is skipped and counted; the good rows survive.
    pairs, report = load_pairs(DataConfig(path=path, on_error="skip"))
    assert len(pairs) == 2 and sum(report.skipped.values()) == 1
    assert problem in next(iter(report.skipped))


def test_wrong_schema_for_the_view(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match="'response_0': missing field") as info:
        load_pairs(DataConfig(path=path, view="safety"))
    assert "set data.view=pairs" in str(info.value)  # the error names the fix
    # The setting that chose the view is the one named (a stage's own view, in training).
    with pytest.raises(DataError, match="set stages.1.view=pairs"):
        load_pairs(DataConfig(path=path, view="helpfulness"), view_key="stages.1.view")
    pku = write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS[:2])
    with pytest.raises(DataError, match="'chosen': missing field") as info:
        load_pairs(DataConfig(path=pku, view="pairs"))
    assert "set data.view=helpfulness or data.view=safety" in str(info.value)
    assert info.value.line == 1


TRL_ROWS = [
    {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
    {
        "prompt": [{"role": "user", "content": "name a colour"}],
        "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "seven"}],
    },
]


def test_trl_schema_needs_no_setting(tmp_path):
    """TRL's prompt/chosen/rejected (strings or messages) under the default view, "auto"."""
    assert DataConfig().view == "auto"
    path = write_jsonl(tmp_path / "trl.jsonl", TRL_ROWS)
    pairs, report = load_pairs(DataConfig(path=path))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("hi", "hello", "go away"),
        (TRL_ROWS[1]["prompt"], "blue", "seven"),
    ]
    assert report.views == {"pairs": 2} and "read as pairs=2" in report.summary()
    explicit, _ = load_pairs(DataConfig(path=path, view="pairs"))
    assert explicit == pairs


def test_auto_reads_pku_rows_as_helpfulness(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS)
    auto, report = load_pairs(DataConfig(path=path))
    helpful, _ = load_pairs(DataConfig(path=path, view="helpfulness"))
    assert auto == helpful and report.views == {"helpfulness": len(PKU_ROWS)}


def test_trl_implicit_prompt(tmp_path):
    """No `prompt`: the turns chosen and rejected share before their last message (TRL)."""
    user = {"role": "user", "content": "hi"}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "hello"}],
            "rejected": [user, {"role": "assistant", "content": "go away"}],
        },
        {  # different first turns: no prompt to share
            "chosen": [user, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "b"}],
        },
        {"chosen": "hello", "rejected": "go away"},  # strings: no turn structure
    ]
    path = write_jsonl(tmp_path / "implicit.jsonl", rows)
    pairs, report = load_pairs(DataConfig(path=path, on_error="skip"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [([user], "hello", "go away")]
    assert sum(report.skipped.values()) == 2
    with pytest.raises(DataError, match="do not share the turns") as info:
        load_pairs(DataConfig(path=path))
    assert (info.value.line, info.value.field) == (2, "prompt")


def test_rows_of_neither_schema_name_their_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"neither TRL's .* the row has \['answer', 'question'\]"):
        load_pairs(DataConfig(path=path))


def test_config_validation():
    with pytest.raises(ValueError, match="view must be one of"):
        DataConfig(view="harmlessness")
    assert set(VIEWS) == {"auto", "pairs", "helpfulness", "safety"}
    with pytest.raises(ValueError, match="on_error"):
        DataConfig(on_error="ignore")
    with pytest.raises(ValueError, match="template must contain"):
        DataConfig(template="USER: {question}")
    with pytest.raises(ValueError, match="response_buckets"):
        DataConfig(max_response_len=64, response_buckets=(32, 128))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(DataConfig(path="/nonexistent/x.jsonl"))


def test_config_embeds_in_an_omegaconf_tree():
    from omegaconf import OmegaConf

    overrides = OmegaConf.from_dotlist(["view=safety", "response_buckets=[64,128]", "seed=7"])
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), overrides))
    assert config == DataConfig(view="safety", response_buckets=(64, 128), seed=7)
    with pytest.raises(ValueError, match="view must be one of"):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"view": "harmless"}))
