"""The sharded train step on 8 simulated CPU devices equals the single-device step.

Runs `sharded_check.py` in a subprocess: the device count is fixed per process, and pytest-xdist
workers share imports. Parameters are compared after two AdamW steps at lr 1e-3 (Adam divides by
the gradient's RMS, so float reassociation in near-zero gradient entries shows up in the update
scaled by the learning rate; the loss and the gradient norm are compared directly)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_meshes_and_microbatches_match_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["single_compiles"] == 1
    for name in ("8x1x1", "2x2x2", "1x4x2", "micro4"):
        case = out[name]
        assert case["compiles"] == 1, (name, case)
        assert case["loss_diff"] <= 1e-5, (name, case)
        assert case["grad_norm_rel_diff"] <= 1e-5, (name, case)
        assert case["param_diff"] <= 1e-5, (name, case)
    for name in ("8x1x1", "2x2x2", "1x4x2"):
        assert out[name]["sharded_params"] > 0, out[name]  # parameters really are partitioned
