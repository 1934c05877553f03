"""Reading preference rows from JSON Lines, Parquet and `save_to_disk` directories, and the views.

A row is validated against its schema and turned into a `PairRecord` by the stage's view:
  auto:        TRL's schema as pairs, a PKU-SafeRLHF row as helpfulness (the default)
  pairs:       chosen / rejected as given              (TRL's prompt/chosen/rejected schema)
  helpfulness: chosen = response[better_response_id]   (PKU-SafeRLHF schema)
  safety:      chosen = response[safer_response_id]    (PKU-SafeRLHF schema)
TRL's schema takes strings or message lists, with an explicit `prompt` or, for message lists,
the implicit prompt (the turns `chosen` and `rejected` share before their last message). A row
whose schema does not fit an explicit view is an error that names the view to set.
Bad rows raise `DataError` naming file, line and field, or with `on_error="skip"` are skipped and
counted. Rows that are not preferences (identical responses, a null label) are always dropped and
counted: nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rsa_jax.data._config import FORMATS, DataConfig

Text = str | list  # a string, or a list of chat messages {"role": ..., "content": ...}


class DataError(ValueError):
    """A malformed input row or file: names the file, the line (1-based; 0: the whole file) and
    the field."""

    def __init__(self, path: str, line: int, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = path, line, field, problem
        # line 0: the whole file (unreadable, or no pairs), not one of its rows
        where = (f"{path}:{line}" if line else path) + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """One preference pair before tokenisation; `origin` is 'file:line' for error messages."""

    prompt: Text
    chosen: str
    rejected: str
    origin: str


@dataclasses.dataclass
class DataReport:
    """What was read, kept, dropped and skipped, per reason."""

    rows_read: int = 0
    pairs_kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # The view each kept or dropped row was read under (what view "auto" resolved to).
    views: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        parts = [f"read {self.rows_read} rows, kept {self.pairs_kept} pairs"]
        if self.views:
            parts.append("read as " + _fmt(self.views))
        if self.dropped:
            parts.append("dropped (not a preference): " + _fmt(self.dropped))
        if self.skipped:
            parts.append("skipped (bad input): " + _fmt(self.skipped))
        return "; ".join(parts)


def _fmt(counter) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in sorted(counter.items()))


def _detect_format(path: str) -> str:
    if os.path.isdir(path):
        return "arrow_dir"
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    raise DataError(
        path,
        0,
        None,
        "cannot tell the format from the name (.jsonl, .json, .parquet or a save_to_disk "
        f"directory); set data.format to one of {', '.join(f for f in FORMATS if f != 'auto')}",
    )


_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors write at the start


def _read_json_array(path: str) -> Iterator[tuple[int, Any]]:
    """A .json file holding one array of rows; the 'line' of a row is its 1-based item number."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        items = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, None, f"not valid UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"malformed JSON: {e.msg}") from None
    if not isinstance(items, list):
        raise DataError(path, 1, None, f"expected an array of rows, got {type(items).__name__}")
    yield from enumerate(items, start=1)


def _starts_with_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(_BOM).lstrip()
    return head.startswith(b"[")


def _read_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    if path.endswith(".json") and _starts_with_array(path):
        yield from _read_json_array(path)
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(_BOM)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, DataError(path, line_no, None, f"not valid UTF-8 ({e.reason})")
                continue
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, DataError(path, line_no, None, f"malformed JSON: {e.msg}")


def _read_table(table: pa.Table, path: str, first_line: int) -> Iterator[tuple[int, Any]]:
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:
        # Parquet and Arrow do not check that a string column holds UTF-8; find the bad cells
        # row by row so each one is reported (or skipped) with its row and column.
        yield from _read_table_by_cell(table, path, first_line)
        return
    for offset, row in enumerate(rows):
        yield first_line + offset, row


def _read_table_by_cell(table: pa.Table, path: str, first_line: int):
    columns = {name: table.column(name) for name in table.column_names}
    for offset in range(table.num_rows):
        row, error = {}, None
        for name, column in columns.items():
            try:
                row[name] = column[offset].as_py()
            except UnicodeDecodeError as e:
                error = DataError(path, first_line + offset, name, f"not valid UTF-8 ({e.reason})")
                break
        yield first_line + offset, error if error is not None else row


def _json_file(path: str) -> Any:
    """A small JSON metadata file (state.json, dataset_dict.json); DataError naming it if bad."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"malformed JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, 0, None, f"not valid UTF-8 ({e.reason})") from None


def _arrow_files(path: str) -> list[str]:
    """The Arrow stream files that a save_to_disk directory's state.json lists, in order."""
    state_path = os.path.join(path, "state.json")
    splits_path = os.path.join(path, "dataset_dict.json")
    if not os.path.exists(state_path) and os.path.exists(splits_path):
        splits = _json_file(splits_path)
        splits = splits.get("splits", []) if isinstance(splits, dict) else []
        raise DataError(
            path,
            0,
            None,
            f"a DatasetDict with splits {splits}: point data.path at one split's directory, "
            f"e.g. {os.path.join(path, splits[0] if splits else 'train')}",
        )
    if not os.path.exists(state_path):
        raise DataError(path, 0, None, "no state.json: not a save_to_disk directory")
    state = _json_file(state_path)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(state_path, 0, "_data_files", "missing, or lists no data files")
    files = []
    for i, entry in enumerate(entries):
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(state_path, 0, f"_data_files[{i}]", "needs a 'filename' string")
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise DataError(full, 0, None, "listed in state.json but missing")
        files.append(full)
    return files


def _arrow_table(path: str, reader) -> pa.Table:
    """`reader(path)` as a Table; a file pyarrow cannot read is a DataError naming it."""
    try:
        return reader(path)
    except (pa.ArrowException, OSError) as e:  # garbage, a truncated footer or stream, EIO
        raise DataError(path, 0, None, f"unreadable ({type(e).__name__}: {e})") from None


def _read_stream(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all()


def _read_arrow_dir(path: str) -> Iterator[tuple[int, Any]]:
    """A `datasets.Dataset.save_to_disk` directory: state.json lists Arrow stream files in order."""
    line = 1
    for name in _arrow_files(path):
        table = _arrow_table(name, _read_stream)
        yield from _read_table(table, name, line)
        line += table.num_rows


def read_rows(path: str, fmt: str = "auto") -> Iterator[tuple[str, int, Any]]:
    """Yields (file, line, row dict or DataError) from any supported source."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.path {path!r} does not exist")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt == "jsonl":
        rows = _read_jsonl(path)
    elif fmt == "parquet":
        rows = _read_table(_arrow_table(path, pq.read_table), path, 1)
    else:
        rows = _read_arrow_dir(path)
    for line, row in rows:
        yield path, line, row


def _text(row: dict, field: str, path: str, line: int) -> Text:
    """A non-empty string, or a non-empty list of {role, content} messages."""
    if field not in row:
        raise DataError(path, line, field, "missing field")
    value = row[field]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(path, line, field, "empty text")
        return value
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            ok = isinstance(message, dict) and isinstance(message.get("content"), str)
            if not ok or not isinstance(message.get("role"), str):
                raise DataError(
                    path, line, f"{field}[{i}]", "messages need string role and content"
                )
        return value
    raise DataError(
        path, line, field, f"expected a string or a list of messages, got {type(value).__name__}"
    )


def _response(row: dict, field: str, path: str, line: int) -> str:
    """The response text: a string, or the content of the LAST message of a message list, which
    must come from the assistant (earlier turns, e.g. a repeated user turn, are the prompt's)."""
    value = _text(row, field, path, line)
    if isinstance(value, str):
        return value
    last = value[-1]
    if last["role"] != "assistant":
        raise DataError(
            path, line, f"{field}[{len(value) - 1}]", "the last message must be the assistant's"
        )
    if not last["content"].strip():
        raise DataError(path, line, f"{field}[{len(value) - 1}]", "empty text")
    return last["content"]


def _label(row: dict, field: str, path: str, line: int) -> int | None:
    """0 or 1; None when the label is null (then the row is not a preference)."""
    if field not in row:
        raise DataError(path, line, field, "missing field")
    value = row[field]
    if value is None:
        return None
    if isinstance(value, bool) or value not in (0, 1):
        raise DataError(path, line, field, f"must be 0 or 1, got {value!r}")
    return int(value)


PAIR_FIELDS = ("chosen", "rejected")  # TRL's preference schema (with "prompt", or implicit)
PKU_FIELDS = ("response_0", "response_1")  # PKU-SafeRLHF's


def _schema(row: dict) -> str | None:
    """ "pairs" (TRL's fields), "pku" (PKU-SafeRLHF's), or None (neither)."""
    if any(f in row for f in PAIR_FIELDS):
        return "pairs"
    if any(f in row for f in PKU_FIELDS):
        return "pku"
    return None


def resolve_view(row: dict, view: str, path: str, line: int, view_key: str = "data.view") -> str:
    """The view a row is read under: `view` itself, or for "auto" the one its fields name.

    A row whose fields contradict an explicit view raises a DataError that names the setting
    (`view_key`) and the value that fits the file.
    """
    schema = _schema(row)
    if view == "auto":
        if schema is None:
            raise DataError(
                path,
                line,
                None,
                "neither TRL's preference fields (prompt, chosen, rejected) nor PKU-SafeRLHF's "
                f"(prompt, response_0, response_1 and the labels); the row has {sorted(row)}",
            )
        return "pairs" if schema == "pairs" else "helpfulness"
    if view == "pairs" and schema == "pku":
        missing = next(f for f in PAIR_FIELDS if f not in row)
        raise DataError(
            path,
            line,
            missing,
            "missing field: the row has PKU-SafeRLHF's response_0/response_1, which view "
            f"'pairs' does not read; set {view_key}=helpfulness or {view_key}=safety "
            "(the label that picks the chosen response)",
        )
    if view != "pairs" and schema == "pairs":
        missing = next(f for f in PKU_FIELDS if f not in row)
        raise DataError(
            path,
            line,
            missing,
            f"missing field: view {view!r} reads PKU-SafeRLHF rows, and this row has TRL's "
            f"prompt/chosen/rejected fields; set {view_key}=pairs (or auto)",
        )
    return view


def _implicit_prompt(row: dict, path: str, line: int) -> list:
    """TRL's implicit prompt: the messages `chosen` and `rejected` share before their last."""
    chosen, rejected = (_text(row, f, path, line) for f in PAIR_FIELDS)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(
            path,
            line,
            "prompt",
            "missing field (an implicit prompt needs chosen and rejected as message lists "
            "sharing their first turns)",
        )
    shared = chosen[:-1]
    if not shared or rejected[:-1] != shared:
        raise DataError(
            path,
            line,
            "prompt",
            "missing field, and chosen and rejected do not share the turns before their last "
            "message (TRL's implicit prompt)",
        )
    return shared


def row_to_pair(
    row: Any, view: str, path: str, line: int, view_key: str = "data.view"
) -> PairRecord | str:
    """The view's PairRecord, or the reason (a string) why the row is not a preference.
    `view_key` is the setting an error tells the user to change (e.g. "stages.1.view")."""
    if not isinstance(row, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
    origin = f"{path}:{line}"
    view = resolve_view(row, view, path, line, view_key)
    if view == "pairs":
        if "prompt" in row:
            prompt = _text(row, "prompt", path, line)
        else:
            prompt = _implicit_prompt(row, path, line)
        chosen = _response(row, "chosen", path, line)
        rejected = _response(row, "rejected", path, line)
    else:
        prompt = _text(row, "prompt", path, line)
        responses = (
            _response(row, "response_0", path, line),
            _response(row, "response_1", path, line),
        )
        label = "better_response_id" if view == "helpfulness" else "safer_response_id"
        choice = _label(row, label, path, line)
        if choice is None:
            return f"null {label}"
        chosen, rejected = responses[choice], responses[1 - choice]
    if chosen == rejected:
        return "identical responses"
    return PairRecord(prompt=prompt, chosen=chosen, rejected=rejected, origin=origin)


def load_pairs(
    config: DataConfig, *, view_key: str = "data.view"
) -> tuple[list[PairRecord], DataReport]:
    """All pairs of `config.path` under `config.view`, with the report of what was left out.
    `view_key`: the setting that chose the view, which a schema mismatch tells the user to set."""
    report = DataReport()
    pairs: list[PairRecord] = []
    for path, line, row in read_rows(config.path, config.format):
        report.rows_read += 1
        try:
            if isinstance(row, DataError):
                raise row
            result = row_to_pair(row, config.view, path, line, view_key)
            if isinstance(row, dict):
                report.views[resolve_view(row, config.view, path, line, view_key)] += 1
        except DataError as e:
            if config.on_error == "raise":
                raise
            report.skipped[f"{e.field or 'row'}: {e.problem}"] += 1
            continue
        if isinstance(result, str):
            report.dropped[result] += 1
        else:
            pairs.append(result)
    report.pairs_kept = len(pairs)
    if not pairs:
        what = report.summary() if report.rows_read else "the file holds no rows"
        raise DataError(
            config.path, 0, None, f"no preference pairs under view {config.view!r}: {what}"
        )
    return pairs, report
