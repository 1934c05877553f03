"""The run directory's layout has one owner: each of its file and folder names is spelled in
`rsa_jax/training/_rundir.py` (`RunDir`) and nowhere else in the package. (`rsa_jax/models`
is left out: it writes Hugging Face directories, whose own `config.json` is another file.)"""

import ast
import json
import os
import shutil

import pytest

from rsa_jax.training import RunDir, SourceError, resolve_source
from rsa_jax.training._rundir import Source

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "rsa_jax")
NAMES = [
    RunDir.CONFIG,
    RunDir.CHECKPOINTS,
    RunDir.METRICS,
    RunDir.TENSORBOARD,
    RunDir.STAGES,
    RunDir.CORRUPT,
    RunDir.EVAL,
    RunDir.LOCK,
]


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        if os.path.relpath(folder, PACKAGE).split(os.sep)[0] == "models":
            continue
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


PATH_FUNCTIONS = {
    "join", "open", "Path", "exists", "isdir", "isfile", "makedirs", "listdir", "rmtree",
    "remove", "glob", "SummaryWriter", "joinpath",
}  # fmt: skip


def _callee(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _path_like_strings(tree: ast.AST):
    """String constants used as parts of paths: arguments of os.path.join / open / Path, operands
    of `/`, constants given a name, any constant with a file extension or a slash, and literal
    parts of f-strings."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                yield node.value.value
        elif isinstance(node, ast.Call) and _callee(node) in PATH_FUNCTIONS:
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield arg.value
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    yield side.value
        elif isinstance(node, ast.JoinedStr):
            for part in node.values:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield from part.value.split("/")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if "." in node.value or "/" in node.value:
                yield from node.value.split("/")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _spelled_in(name: str) -> list[str]:
    found = []
    for path in _modules():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        docs = _docstrings(tree)
        for node in ast.walk(tree):  # a docstring may name the file: that is prose, not layout
            if id(node) in docs:
                node.value = ""
        if name in set(_path_like_strings(tree)):
            found.append(os.path.relpath(path, ROOT))
    return found


@pytest.mark.parametrize("name", NAMES)
def test_each_run_directory_name_is_spelled_in_one_module(name):
    assert _spelled_in(name) == [os.path.join("rsa_jax", "training", "_rundir.py")]


def test_the_scan_sees_a_path_literal_outside_the_owner(tmp_path, monkeypatch):
    # The check would catch a stray literal (it is not vacuous).
    stray = tmp_path / "stray.py"
    stray.write_text('import os\nx = os.path.join("run", "metrics.jsonl")\n')
    tree = ast.parse(stray.read_text())
    assert "metrics.jsonl" in set(_path_like_strings(tree))


# ------------------------------------------------------------------------ one resolver


def _run(tmp_path, name="run", stages=("helpfulness", "safety")):
    run = tmp_path / name
    (run / RunDir.CHECKPOINTS / "3").mkdir(parents=True)
    (run / RunDir.CONFIG).write_text(json.dumps({"stages": [{"name": s} for s in stages]}))
    return run


def test_run_run_at_stage_and_hugging_face_directories_resolve_alike(tmp_path):
    run = _run(tmp_path)
    assert resolve_source(str(run)) == Source(str(run), str(run), "run")
    for stage in ("0", "1", "safety"):
        source = resolve_source(f"{run}@{stage}")
        assert (source.kind, source.path, source.stage) == ("run", str(run), stage)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    assert resolve_source(str(hf)).kind == "hf"
    odd = tmp_path / "a@b"  # an existing path with an @ is itself
    shutil.copytree(hf, odd)
    assert resolve_source(str(odd)) == Source(str(odd), str(odd), "hf")


@pytest.mark.parametrize(
    "text, hf_ok, error, words",
    [
        ("{tmp}/missing", True, SourceError, "does not exist"),
        ("{tmp}/run@2", True, ValueError, "no stage '2'; the run's stages are"),
        ("{tmp}/run@nope", True, ValueError, "['helpfulness', 'safety']"),
        ("{tmp}/hf@0", True, SourceError, "@STAGE applies to run directories"),
        ("{tmp}/hf", False, SourceError, "is a Hugging Face model directory, not a run"),
        ("{tmp}/fresh", True, SourceError, "has no checkpoints/ yet: train it first"),
        ("{tmp}/empty", True, SourceError, "is neither a run directory"),
        ("{tmp}/empty", False, SourceError, "is not a run directory (no config.json"),
    ],
)
def test_resolver_errors_say_what_the_path_is(tmp_path, text, hf_ok, error, words):
    _run(tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / RunDir.CONFIG).write_text("{}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(error) as info:
        resolve_source(text.replace("{tmp}", str(tmp_path)), hf_ok=hf_ok)
    assert words in str(info.value)


def test_gs_url_stays_a_url_and_other_schemes_are_refused_not_made_local_folders(
    tmp_path, monkeypatch
):
    """gs:// run directories are object storage (tests/training/test_object_storage.py); s3://
    is refused with the reason (Orbax writes arrays to gs:// and local paths only), and no URL
    ever becomes a local folder named "gs:" or "s3:"."""
    from rsa_jax.training import RunDirError

    monkeypatch.chdir(tmp_path)
    run = RunDir("gs://bucket/run/")
    assert run.path == "gs://bucket/run"
    assert run.checkpoints == "gs://bucket/run/checkpoints"
    assert run.stage_policy(0) == "gs://bucket/run/stages/0"
    with pytest.raises(RunDirError, match="s3:// run directories are not supported.*Orbax"):
        RunDir("s3://bucket/run")
    with pytest.raises(RunDirError, match="only local paths and gs:// URLs"):
        RunDir("ftp://host/run")
    assert os.listdir(tmp_path) == []


def test_gs_run_dir_without_gcsfs_names_the_cloud_extra(monkeypatch):
    import importlib.util

    from rsa_jax.training import RunDirError

    real = importlib.util.find_spec
    missing = lambda name, *a: None if name == "gcsfs" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(RunDirError, match=r"need gcsfs: pip install -e '.\[cloud\]'"):
        RunDir("gs://bucket/run")
