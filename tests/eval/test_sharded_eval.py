"""Sampling and teacher-forced scoring on 8 simulated CPU devices, the parameters sharded as in
training, equal the single-device results.

Runs `sharded_eval_check.py` in a subprocess (the device count is fixed per process) with this
checkout first on the path. Tokens must be identical for the same seed (each row samples with
its own key, so neither the batch size nor the mesh changes them); log-probabilities (sums of
up to 6 token log-probs of size ~5 each) and the policy/reference log-ratios agree to 1e-5."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rsa_jax.config import MeshConfig, ModelConfig
from rsa_jax.eval import evaluate_model, response_logprob
from rsa_jax.models import tiny_config
from rsa_jax.tasks import TEMPLATE, OracleScorer, SafetyTask, make_tokenizer
from rsa_jax.training import Layout, define_model, init_params, make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TASK = SafetyTask()
TOK = make_tokenizer(TASK)
PROMPTS = ["ask topic0 style1 n2", "ask topic3 style5 n0", "ask topic7 style0 n9"]
LLAMA = tiny_config(vocab_size=88, max_position_embeddings=64)  # as in the workers


@pytest.mark.slow  # 8 simulated devices in a subprocess (about 1.5 minutes on 2 cores)
def test_sharded_sampling_and_scoring_equal_one_device(device_script):
    out = device_script(os.path.join(HERE, "sharded_eval_check.py"), timeout=1200)
    assert out["distinct_rows"] > 1  # really sampled, not a constant
    cases = ("single_budget", "8x1x1", "2x2x2", "1x4x2", "2x2x2_budget", "2x2x2_scan", "hf_2x2x2")
    for name in cases:
        case = out[name]
        assert case["same_tokens"] and case["same_lengths"] and case["same_texts"], (name, case)
        assert case["logprob_diff"] <= 1e-5, (name, case)
        assert case["logratio_diff"] <= 1e-5, (name, case)
    # Batches: one of 16 rows (15 filled up to a multiple of the row shards), or as many as the
    # memory budget allows: one row per device.
    assert out["single_budget"]["batches"] == [1] * 15
    assert out["2x2x2"]["batches"] == [16]
    assert out["2x2x2_budget"]["batches"] == [4] * 4
    # Parameters are really partitioned where the mesh has fsdp/tensor axes.
    assert out["8x1x1"]["sharded_params"] == 0 and out["8x1x1"]["row_shards"] == 8
    for name in ("2x2x2", "1x4x2", "hf_2x2x2"):
        assert out[name]["sharded_params"] > 0, (name, out[name])
    # The KV cache [L=2, R=16, S, K=2, E=16] lives split: rows over data*fsdp, K over tensor.
    assert [s.split(",")[1:4:2] for s in out["8x1x1"]["cache_shapes"]] == [["2", "2"]]
    for name in ("2x2x2", "1x4x2"):
        assert [s.split(",")[1:4:2] for s in out[name]["cache_shapes"]] == [["4", "1"]], out[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two JAX processes (minutes on 2 cores), like the training multi-process tests
def test_two_processes_evaluate_like_one_device(tmp_path):
    """Two JAX processes x 4 CPU devices (one 2x2x2 mesh, gloo): rows are placed per process and
    gathered back, and every process gets the single-device samples and log-probabilities."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    prefix = str(tmp_path / "out")
    procs = []
    for i in range(2):
        env_i = {
            **env,
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
        }
        command = [sys.executable, os.path.join(HERE, "multiprocess_eval_worker.py"), "4", prefix]
        procs.append(
            subprocess.Popen(
                command, env=env_i, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=1200)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            outputs.append(proc.communicate()[0] + "\n[timed out]")
    report = "\n".join(f"--- process {i} ---\n{out[-3000:]}" for i, out in enumerate(outputs))
    assert all(p.returncode == 0 for p in procs), report

    # The same evaluation on this process's one device (the jitted init gives the same values
    # on any sharding, as the 8-device check shows).
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])

    def build(seed):
        config = ModelConfig(compute_dtype="float32", remat=False, init_seed=seed)
        spec = define_model(config, LLAMA, Layout(mesh, MeshConfig().rules))
        return spec.module(init_params(spec, config))

    scores, samples = evaluate_model(
        build(0), TOK, PROMPTS, OracleScorer(TASK), reference=build(1), n=5, max_new_tokens=6,
        seed=7, template=TEMPLATE,
    )  # fmt: skip
    logp = response_logprob(build(0), samples)
    assert samples.tokens.shape == (15, 6)
    for i in range(2):
        got = np.load(f"{prefix}_{i}.npz")
        np.testing.assert_array_equal(got["tokens"], samples.tokens)
        np.testing.assert_array_equal(got["lengths"], samples.lengths)
        np.testing.assert_allclose(got["logp"], logp, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["logratio"], scores.logratio, rtol=0, atol=1e-5)
