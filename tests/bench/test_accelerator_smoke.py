"""bench/accelerator.sh --smoke runs end to end on the CPU: every model and variant is measured,
and the FLOP count it divides by is the model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import accelerator  # noqa: E402


@pytest.mark.slow
def test_smoke_run_measures_every_model_and_variant():
    # No time budget here: on a loaded shared CPU the 8 small compiles alone took about 9 minutes.
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", TIMEOUT_S="1800")
    script = os.path.join(ROOT, "bench", "accelerator.sh")
    out = subprocess.run(
        ["bash", script, "--smoke", "--peak-tflops", "1", "--budget-s", "1e9"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1900,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    got = {(r["model"], r["variant"]) for r in result["results"]}
    want = {(m, v) for m in ("smollm2-135m", "llama-1b") for v, _, _ in accelerator.VARIANTS}
    assert got == want
    for r in result["results"]:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert 0 < r["mfu"] < 1  # against a 1 TFLOP/s peak, a tiny CPU step is far below it
        assert r["loss"] == pytest.approx(r["loss"])  # finite


def test_flop_count_matches_the_model_parameters():
    from flax import nnx

    from rsa_jax.models import Llama

    config = accelerator.tiny_config(tie_word_embeddings=False)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    total = sum(int(v.size) for _, v in nnx.to_flat_state(params))
    norms = config.num_hidden_layers * 2 * config.hidden_size + config.hidden_size
    embed = config.vocab_size * config.hidden_size  # a lookup, not a matmul
    assert accelerator.matmul_params(config) == total - norms - embed
    # 8 N + 16 l h e s per token: 3 passes of the policy (fwd + bwd) and 1 of the reference.
    n, rows, length = accelerator.matmul_params(config), 4, 32
    attn = config.num_hidden_layers * config.num_attention_heads * config.head_dim * length
    assert accelerator.flops_per_step(config, rows, length) == (8 * n + 16 * attn) * rows * length


def test_peak_table():
    assert accelerator.peak_flops("NVIDIA H100 80GB HBM3", None) == pytest.approx(989.4e12)
    assert accelerator.peak_flops("NVIDIA H100 PCIe", None) == pytest.approx(756e12)
    assert accelerator.peak_flops("NVIDIA H200", None) == pytest.approx(989.4e12)
    assert accelerator.peak_flops("cpu", None) is None
    assert accelerator.peak_flops("cpu", 2.0) == pytest.approx(2e12)
