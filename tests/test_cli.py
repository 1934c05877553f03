"""The command line: help text, --version, one-line errors (tracebacks only under -v), exit
codes, and the export flags reaching save_hf."""

from __future__ import annotations

import json
import os

import pytest

from rsa_jax import __version__
from rsa_jax.cli import _EXAMPLES, EXIT_ERROR, EXIT_USAGE, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = [
    "train",
    "compile",
    "check-config",
    "merge",
    "export",
    "eval",
    "generate",
    "sweep",
    "frontier",
    "demo",
    "demo-real",
    "toy-data",
]


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_help_lists_every_command_with_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith(".")  # not cut mid-list
    for name in COMMANDS:
        assert name in description and f"    {name}" in out
    assert "exit codes:" in out and "130" in out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_an_example(name, capsys):
    assert set(_EXAMPLES) == set(COMMANDS)
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    assert "example:" in out and f"rsa-jax {name}" in out.split("example:")[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rsa-jax {__version__}"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["export", "{tmp}/missing", "{tmp}/out"], "does not exist"),
        (["export", "{tmp}", "{tmp}/out"], "no config.json"),
        (["merge", "{tmp}/a", "{tmp}/b", "--out", "{tmp}/m"], "does not exist"),
        (["merge", "{tmp}/a", "{tmp}/b", "--out", "{tmp}/m", "--q", "2"], "--q must lie"),
        (["eval", "{tmp}/missing", "--task", "safety", "--out", "{tmp}/e"], "does not exist"),
        (["sweep", "{tmp}/none.yaml"], "does not exist"),
        (["check-config", "{tmp}/none.yaml"], "config file not found"),
        (
            ["check-config", os.path.join(ROOT, "configs", "tiny.yaml"), "train.log_every=0"],
            "train.log_every",
        ),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, argv, fragment):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    lines = _stderr_lines(capsys)
    assert code == EXIT_USAGE
    assert len(lines) == 1 and lines[0].startswith(f"rsa-jax {argv[0]}: ") and fragment in lines[0]


def test_a_run_directory_without_checkpoints_says_to_train_first(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == EXIT_USAGE
    (line,) = _stderr_lines(capsys)
    assert "no checkpoints/" in line and "rsa-jax train" in line


def test_runtime_errors_are_one_line_and_the_traceback_needs_v(tmp_path, capsys):
    target = str(tmp_path / "not_a_dir" / "x.jsonl")
    (tmp_path / "not_a_dir").write_text("a file")
    assert main(["toy-data", target]) == EXIT_ERROR
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("rsa-jax toy-data: error: ")
    assert "Traceback" not in "\n".join(lines)
    assert main(["-v", "toy-data", target]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1].startswith(
        "rsa-jax toy-data"
    )
    # -v after the command works too.
    assert main(["toy-data", target, "-v"]) == EXIT_ERROR
    assert "Traceback" in capsys.readouterr().err


def test_missing_model_path_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "models" / "sft")
    config = os.path.join(ROOT, "configs", "tiny.yaml")
    code = main(["train", config, f"model.path={missing}", f"train.run_dir={tmp_path / 'run'}"])
    lines = _stderr_lines(capsys)
    # A config error (exit 2, nothing was run): the trainer checks model.path before any work.
    assert code == EXIT_USAGE and len(lines) == 1
    assert missing in lines[0] and "does not exist" in lines[0] and "Repo id" not in lines[0]


def test_export_flags_reach_save_hf(tmp_path, monkeypatch, capsys):
    from flax import nnx
    from safetensors import safe_open

    import rsa_jax.training as training
    from rsa_jax.models import Llama, tiny_config

    model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    policy = training.Policy(params=model, build=lambda m: m, tokenizer=None, llama=None, source="")
    monkeypatch.setattr(training, "load_source", lambda source: policy)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    out = tmp_path / "hf"
    argv = ["export", str(run), str(out), "--dtype", "bfloat16", "--max-shard-size", "40KB"]
    assert main(argv) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    with safe_open(str(out / shards[0]), framework="numpy") as f:
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "bfloat16"
    args = build_parser().parse_args(["merge", "a", "b", "--out", "m"])
    assert (args.dtype, args.max_shard_size) == ("float32", 5 * 10**9)


def test_a_commands_own_exit_message_gets_the_same_one_line_form(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["eval", str(tmp_path), "--out", str(tmp_path / "o")])
    assert str(info.value.code) == (
        "rsa-jax eval: error: without --task, give --judge (or --scorer module:attr) and --prompts"
    )


def test_demo_real_quick_reaches_the_demo_with_toy_sizes(monkeypatch, tmp_path):
    from rsa_jax import demo_real

    seen = []
    monkeypatch.setattr(demo_real, "run_real_demo", seen.append)
    assert main(["demo-real", "--out", str(tmp_path), "--seed", "3"]) == 0
    assert seen[-1] == demo_real.RealDemoConfig(out_dir=str(tmp_path), seed=3)
    assert main(["demo-real", "--quick", "--out", str(tmp_path)]) == 0
    full, quick = seen
    assert quick.methods == full.methods  # every method, smaller
    assert quick.train_harmful < full.train_harmful and quick.eval_samples < full.eval_samples
