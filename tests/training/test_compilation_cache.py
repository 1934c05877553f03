"""`train.compilation_cache_dir`: JAX's persistent compilation cache, and the lines `fit`
prints around each step compile."""

from __future__ import annotations

import os

import jax
import pytest

from rsa_jax.config import load_config
from rsa_jax.training import train
from rsa_jax.training._engine import clear_step_cache, compilation_cache_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir("auto") == str(tmp_path / "rsa_jax" / "jax_cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    home = os.path.expanduser("~")
    assert compilation_cache_dir("auto") == os.path.join(home, ".cache", "rsa_jax", "jax_cache")
    assert compilation_cache_dir("~/jc") == os.path.join(home, "jc")
    assert compilation_cache_dir("") is None


@pytest.fixture
def jax_cache_settings():
    """Every program goes to the cache, however fast this machine compiles it; the process's
    cache settings are restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


@pytest.mark.slow
def test_second_start_of_a_run_loads_its_steps_from_the_cache(tmp_path, capfd, jax_cache_settings):
    from rsa_jax.data import write_toy_data

    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=16)
    cache = tmp_path / "cache"

    def start(run: str) -> list[str]:
        clear_step_cache()
        jax.clear_caches()  # nothing compiled in memory: a new process as far as jax knows
        overrides = [
            f"data.path={data}",
            f"train.run_dir={tmp_path / run}",
            f"train.compilation_cache_dir={cache}",
            "stages.0.steps=1",
            "stages.1.steps=1",
            "checkpoint.every=0",
        ]
        train(load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides))
        return capfd.readouterr().err.splitlines()

    first = start("first")
    assert "compiling the step of stage 0 (helpfulness) for batches of 8x32 tokens ..." in first
    assert any(line.startswith("compiled the step of stage 0 (helpfulness) in ") for line in first)
    # stage 1's program is stage 0's (same shapes; only the reference's values differ), so
    # the first start may already load it from the cache stage 0 wrote
    assert any(
        line.startswith(
            (
                "compiled the step of stage 1",
                "loaded from the compilation cache the step of stage 1",
            )
        )
        for line in first
    ), first
    assert os.listdir(cache)  # the first start wrote its programs
    second = start("second")
    for stage in ("0 (helpfulness)", "1 (safety)"):
        loaded = f"loaded from the compilation cache the step of stage {stage} in "
        assert any(line.startswith(loaded) for line in second), second
