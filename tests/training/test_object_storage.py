"""Run directories on Cloud Storage, against an emulator started here on 127.0.0.1
(`gcs_emulator`: gcp-storage-emulator, in the `dev` extra; skipped when it or gcsfs is missing).

- The lease that replaces flock: a second owner is refused with the holder's name, a released
  or expired lease is taken over, a write that lost the race to another owner (generation
  changed between read and write) is refused, and the holder renews it.
- A corrupt checkpoint in the bucket is set aside (copied to corrupt/, deleted) and the
  previous one used.
- A tiny two-stage run in the bucket, SIGKILLed mid-stage and resumed after its lease expired,
  ends bitwise where an uninterrupted run on local disk ends; `rsa-jax export` and `eval` read
  the bucket and give what they give for the local run (slow: three tiny runs).

Not covered here: s3:// (refused: Orbax 0.12.8 has no s3:// array path), sweeps into a bucket
(refused), W&B / MLflow trackers of a bucket run, several processes writing one bucket run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator (dev extra) is not installed")
pytest.importorskip("gcsfs", reason="gcsfs (cloud extra) is not installed")

import gcs_emulator  # noqa: E402  (tests/training, on sys.path under pytest)

from rsa_jax.config import load_config  # noqa: E402
from rsa_jax.data import write_toy_data  # noqa: E402
from rsa_jax.training import RunDir, RunDirError, load_policy, train  # noqa: E402
from rsa_jax.training._rundir import RunLock  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
BUCKET = "rsa-jax-test"
LEASE = 4.0  # seconds: short, so the killed run's lease expires within the test
OVERRIDES = [  # tests/training/test_train.py's run
    "stages.0.view=safety",
    "stages.0.steps=6",
    "stages.1.steps=3",
    "checkpoint.every=1",
    "optim.learning_rate=3e-3",
]


@pytest.fixture(scope="module")
def emulator():
    import logging

    import gcsfs

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are expected
    server, url = gcs_emulator.start(BUCKET)
    env = {**gcs_emulator.environment(url), "RSA_JAX_LEASE_SECONDS": str(LEASE)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    gcsfs.GCSFileSystem.clear_instance_cache()  # an instance made before would miss the emulator
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcsfs.GCSFileSystem.clear_instance_cache()
        server.stop()


def _cat(url: str) -> bytes:
    """The object's bytes as stored now (no gcsfs listing cache in between)."""
    import fsspec

    fs = fsspec.filesystem("gs")
    bucket, _, key = url.removeprefix("gs://").partition("/")
    try:
        return fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")[1]
    except FileNotFoundError:
        return b""


# ------------------------------------------------------------------------------- the lease


def test_lease_refuses_a_second_owner_and_is_taken_over_when_released_or_expired(emulator):
    from rsa_jax.training._objstore import Lease, LeaseHeld, read_lease

    run = f"gs://{BUCKET}/lease"
    first = RunLock(run).acquire()
    try:
        assert first.held
        record, generation = read_lease(RunDir(run).lock_file)
        assert record is not None and record["pid"] == os.getpid() and generation > 0
        with pytest.raises(RunDirError, match=rf"in use by another trainer \(pid {os.getpid()}"):
            RunLock(run).acquire()
        assert f"pid {os.getpid()}" in (RunDir(run).holder() or "")
    finally:
        first.release()
    assert RunDir(run).holder() is None and _cat(RunDir(run).lock_file) == b""
    second = RunLock(run).acquire()  # released: free again
    second.release()

    # A holder that died: its lease blocks until it expires, then is taken over.
    url = f"gs://{BUCKET}/expired/.lock"
    dead = Lease(url, seconds=0.5).acquire()
    dead._stop.set()  # renewal stops as if the process were killed
    with pytest.raises(LeaseHeld, match="lease expires"):
        Lease(url, seconds=5).acquire()
    time.sleep(0.6)
    heir = Lease(url, seconds=5).acquire()
    assert json.loads(_cat(url))["owner"] == heir.owner
    heir.release()


def test_lease_write_that_lost_the_race_is_refused_and_renewal_moves_the_expiry(
    emulator, monkeypatch
):
    from rsa_jax.training import _objstore
    from rsa_jax.training._objstore import Lease, LeaseHeld, read_lease

    url = f"gs://{BUCKET}/race/.lock"
    stale = Lease(url, seconds=0.2).acquire()
    stale._stop.set()
    time.sleep(0.3)
    # Between our read (expired lease, generation g) and our write, someone else takes it: the
    # write conditional on g must fail, whatever our read said.
    real_read = _objstore.read_lease

    def read_then_lose_the_race(u):
        found = real_read(u)
        Lease(url, seconds=30)._write(found[1])  # the other owner's conditional write wins
        return found

    monkeypatch.setattr(_objstore, "read_lease", read_then_lose_the_race)
    with pytest.raises(LeaseHeld, match="just now"):
        Lease(url, seconds=30).acquire()
    monkeypatch.setattr(_objstore, "read_lease", real_read)

    url = f"gs://{BUCKET}/renew/.lock"
    lease = Lease(url, seconds=0.4).acquire()
    try:
        before, generation = read_lease(url)
        time.sleep(0.5)
        after, renewed = read_lease(url)
        assert lease.held and renewed != generation
        assert before is not None and after is not None and after["expires"] > before["expires"]
    finally:
        lease.release()


@pytest.mark.slow  # two Orbax saves, a failed restore and a copy through the emulator: ~12 s
def test_a_corrupt_checkpoint_in_the_bucket_is_set_aside_and_the_previous_one_used(emulator):
    """No rename on object storage: setting a checkpoint aside copies its objects to corrupt/
    and deletes them from checkpoints/."""
    from etils import epath
    from test_checkpoint import save_steps  # tests/training

    from rsa_jax.training import Checkpoints

    run = f"gs://{BUCKET}/corrupt-run"
    save_steps(run, n=256)
    meta = epath.Path(run) / "checkpoints" / "2" / "meta" / "metadata"
    text = meta.read_text()
    assert '"stage": 0' in text
    meta.write_text(text.replace('"stage": 0', '"stage": 1'))  # still valid JSON
    ckpt = Checkpoints(run)
    assert ckpt.latest_meta()[0] == 1
    ckpt.close()
    moved = epath.Path(run) / "corrupt" / "2" / "meta" / "metadata"
    assert moved.read_text() == text.replace('"stage": 0', '"stage": 1')
    assert not (epath.Path(run) / "checkpoints" / "2").exists()


# ------------------------------------------------------------------- a killed run in the bucket


def _records(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        r = json.loads(line)
        out[(r["stage"], r["step"])] = r  # the last record wins (a resumed run repeats steps)
    return out


@pytest.mark.slow  # three tiny runs (two in subprocesses), two exports, two evals: ~3 min
def test_killed_run_in_the_bucket_resumes_bitwise_and_export_eval_read_it(emulator, tmp_path):
    from safetensors.numpy import load_file

    from rsa_jax.cli import main
    from rsa_jax.eval import read_samples

    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=48)
    local = str(tmp_path / "local")
    base = train(load_config(TINY, [*OVERRIDES, f"data.path={data}", f"train.run_dir={local}"]))
    assert base.status == "done"

    run = f"gs://{BUCKET}/runs/killed"
    cmd = [sys.executable, "-m", "rsa_jax", "train", TINY, *OVERRIDES]
    cmd += [f"data.path={data}", f"train.run_dir={run}"]
    env = {**os.environ, **emulator}
    log = open(tmp_path / "killed.log", "w+")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    metrics = RunDir(run).metrics_file
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if _cat(metrics).count(b"\n") >= 4:
            break
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    killed_at = _cat(metrics).count(b"\n")
    assert 4 <= killed_at < 9

    # The killed trainer's lease outlives it: a new owner is refused until it expires.
    assert f"pid {proc.pid}" in (RunDir(run).holder() or "")
    with pytest.raises(RunDirError, match=f"in use by another trainer \\(pid {proc.pid}"):
        RunLock(run).acquire()
    deadline = time.time() + 2 * LEASE
    while RunDir(run).holder() is not None and time.time() < deadline:
        time.sleep(0.2)
    assert RunDir(run).holder() is None

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done at global step 9" in done.stdout
    assert RunDir(run).holder() is None  # released at the end
    from etils import epath

    events = list(epath.Path(RunDir(run).tensorboard).iterdir())
    assert any("tfevents" in p.name for p in events), events  # tensorboardX's gs:// writer

    base_rec = _records(open(os.path.join(local, "metrics.jsonl")).read())
    rec = _records(_cat(metrics).decode())
    assert sorted(rec) == sorted(base_rec)
    for key in base_rec:
        assert rec[key]["loss"] == base_rec[key]["loss"], key  # bitwise on the CPU
    _, params = load_policy(run)
    assert base.params is not None
    for k, v in base.params.items():
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(jax.device_get(v)), k)

    # export and eval read the bucket and give what they give for the local run.
    for source, name in [(run, "bucket"), (local, "local")]:
        assert main(["export", source, str(tmp_path / f"hf_{name}")]) == 0
        argv = ["eval", source, "--prompts", "benign", "--judge", "refusal", "--prompt-limit"]
        argv += ["2", "--samples", "2", "--max-new-tokens", "4", "--n-boot", "10"]
        assert main([*argv, "--out", str(tmp_path / f"eval_{name}")]) == 0
    exported = [
        load_file(str(tmp_path / f"hf_{n}" / "model.safetensors")) for n in ("bucket", "local")
    ]  # noqa: E501
    assert sorted(exported[0]) == sorted(exported[1])
    for k in exported[1]:
        np.testing.assert_array_equal(exported[0][k], exported[1][k], k)
    samples = [read_samples(tmp_path / f"eval_{n}") for n in ("bucket", "local")]
    assert len(samples[0]) == 4
    fields = ("prompt", "sample", "text", "reward", "cost", "length")
    assert [[r[f] for f in fields] for r in samples[0]] == [
        [r[f] for f in fields] for r in samples[1]
    ]
