"""Sampling and teacher-forced scoring on 8 simulated CPU devices, the parameters sharded as in
training, equal the single-device results.

Runs `sharded_eval_check.py` in a subprocess (the device count is fixed per process) with this
checkout first on the path. Tokens must be identical for the same seed (each row samples with
its own key, so neither the batch size nor the mesh changes them); log-probabilities (sums of
up to 6 token log-probs of size ~5 each) and the policy/reference log-ratios agree to 1e-5."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_sharded_sampling_and_scoring_equal_one_device():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_eval_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
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
