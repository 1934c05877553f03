"""Two JAX processes assemble the global batch from their host blocks: it equals the single-host
batch (chosen rows [0, B), rejected [B, 2B)), bucket shapes included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_assemble_the_single_host_batch(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(13):
            row = {"prompt": f"q{i} " + "help " * (i % 5), "chosen": "safe " * (1 + i % 9)}
            f.write(json.dumps({**row, "rejected": "no " * (1 + i % 3) + "x"}) + "\n")
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, port, str(i), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        outputs.append(out)
    for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, out[-3000:]
        assert f"process {i}: 3 global batches match" in out
