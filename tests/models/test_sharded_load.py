"""A sharded load on 8 simulated CPU devices equals the unsharded one (in a subprocess, since
the device count is fixed when jax starts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # 8 simulated devices in a subprocess (about 25 s on 2 cores)
def test_sharded_load_equals_unsharded(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "sharded_load_check.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, script, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("forward equal") == 2, result.stdout
