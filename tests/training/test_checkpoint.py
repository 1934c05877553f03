"""Checkpoint integrity (checksums of every array, the metadata and the data iterator files),
read-only opening, and writes that cannot happen (read-only directory, full disk) failing at once.

Small pytrees through `Checkpoints` directly; the trainer's own kill/resume tests are in
test_train.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsa_jax.training._checkpoint import (
    CheckpointMismatch,
    Checkpoints,
    CheckpointWriteError,
    CorruptCheckpoint,
    DataIterHandler,
    abstract_like,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


class Iterator:
    """Stands in for a Grain iterator: its state is a position."""

    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def make_state(seed: int, n: int = 4096):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.standard_normal((n // 64, 64)), jnp.float32),
            "e": jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16),
        },
        "step": jnp.int32(seed),
    }


def save_steps(run_dir, steps=(1, 2), *, async_save=False, n=4096):
    ckpt = Checkpoints(run_dir, keep=5, async_save=async_save)
    states = {}
    for s in steps:
        states[s] = make_state(s, n)
        ckpt.save(s, states[s], meta={"stage": 0, "done": False}, data_iter=Iterator(10 * s))
    ckpt.close()
    return states


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def flip_bytes(path, count=16):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = bytearray(f.read(count))
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def snapshot(directory):
    """Every path under `directory` with its mode, size, mtime and content hash."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            digest = None
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, directory)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def test_round_trip_restores_what_was_saved(tmp_path):
    states = save_steps(str(tmp_path))
    ckpt = Checkpoints(str(tmp_path))
    step, meta = ckpt.latest_meta()
    assert step == 2 and meta == {"stage": 0, "done": False}  # the integrity record stripped
    it = Iterator()
    state, reference = ckpt.restore(2, abstract_like(states[2]), data_iter=it)
    ckpt.close()
    assert_same(state, states[2])
    assert reference is None and it.position == 20


def test_flipped_bytes_in_a_data_file_are_detected_and_the_previous_step_used(tmp_path, caplog):
    states = save_steps(str(tmp_path))
    data_file = largest_file(tmp_path / "checkpoints" / "2" / "state")
    flip_bytes(data_file)
    ckpt = Checkpoints(str(tmp_path))
    assert ckpt.latest_meta()[0] == 2  # the metadata itself is intact
    with caplog.at_level("WARNING"), pytest.raises(CorruptCheckpoint, match="checksum differs"):
        ckpt.restore(2, abstract_like(states[2]), data_iter=Iterator())
    assert any("['params']['w']" in r.message for r in caplog.records)
    assert os.path.isdir(tmp_path / "corrupt" / "2")
    assert ckpt.latest_meta()[0] == 1
    state, _ = ckpt.restore(1, abstract_like(states[1]), data_iter=Iterator())
    ckpt.close()
    assert_same(state, states[1])


def test_async_save_checksums_the_arrays_before_they_are_reused(tmp_path):
    ckpt = Checkpoints(str(tmp_path), async_save=True)
    state = make_state(3, n=1 << 16)
    expected = jax.tree.map(np.asarray, state)
    ckpt.save(3, state, meta={"done": False}, data_iter=Iterator())
    for x in jax.tree.leaves(state):  # as the next donated train step does
        x.delete()
    ckpt.close()
    ckpt = Checkpoints(str(tmp_path))
    restored, _ = ckpt.restore(3, abstract_like(make_state(0, n=1 << 16)), data_iter=Iterator())
    ckpt.close()
    assert_same(restored, expected)


def test_edited_metadata_is_detected(tmp_path):
    save_steps(str(tmp_path))
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    text = meta_file.read_text()
    assert '"stage": 0' in text
    meta_file.write_text(text.replace('"stage": 0', '"stage": 1'))  # still valid JSON
    ckpt = Checkpoints(str(tmp_path))
    assert ckpt.latest_meta()[0] == 1
    ckpt.close()
    assert os.path.isdir(tmp_path / "corrupt" / "2")


def test_edited_data_iterator_state_is_detected(tmp_path):
    states = save_steps(str(tmp_path))
    state_file = tmp_path / "checkpoints" / "2" / "data_iter" / "process_0-of-1.json"
    state_file.write_text(json.dumps({"position": 21}))
    ckpt = Checkpoints(str(tmp_path))
    with pytest.raises(CorruptCheckpoint):
        ckpt.restore(2, abstract_like(states[2]), data_iter=Iterator())
    assert ckpt.latest_meta()[0] == 1
    ckpt.close()


def test_other_shapes_are_a_mismatch_and_nothing_is_set_aside(tmp_path):
    save_steps(str(tmp_path))
    before = snapshot(tmp_path)
    ckpt = Checkpoints(str(tmp_path))
    other = make_state(0, n=8192)  # "w" [128, 64] instead of [64, 64]
    with pytest.raises(CheckpointMismatch, match=r"\['params'\]\['w'\]: saved float32\[64, 64\]"):
        ckpt.restore(2, abstract_like(other), data_iter=Iterator())
    ckpt.close()
    after = snapshot(tmp_path)
    # Only the directory's mtime moved (the write probe of a writable opening).
    assert after.pop("checkpoints")[:2] == before.pop("checkpoints")[:2]
    assert after == before


def test_checkpoints_without_checksums_still_restore(tmp_path, caplog):
    # What an older rsa_jax wrote: no integrity record, no iterator sidecar.
    states = save_steps(str(tmp_path), steps=(1,))
    step_dir = tmp_path / "checkpoints" / "1"
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta.pop("integrity")
    meta_file.write_text(json.dumps(meta))
    (step_dir / "data_iter" / "process_0-of-1.sha256").unlink()
    ckpt = Checkpoints(str(tmp_path))
    with caplog.at_level("WARNING"):
        state, _ = ckpt.restore(1, abstract_like(states[1]), data_iter=Iterator())
    ckpt.close()
    assert_same(state, states[1])
    assert any("no checksums" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------ read-only


def test_read_only_skips_a_corrupt_newest_step_and_changes_nothing(tmp_path, caplog):
    states = save_steps(str(tmp_path), steps=(1, 2, 3))
    flip_bytes(largest_file(tmp_path / "checkpoints" / "3" / "state"))
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("{not json")
    before = snapshot(tmp_path)
    ckpt = Checkpoints(str(tmp_path), read_only=True)
    found = []
    with caplog.at_level("WARNING"):
        while True:  # the loop `latest_policy` runs
            step, _ = ckpt.latest_meta()
            try:
                state, _ = ckpt.restore(step, abstract_like(states[step]), data_iter=None)
                break
            except CorruptCheckpoint:
                found.append(step)
    with pytest.raises(RuntimeError, match="read-only"):
        ckpt.save(4, states[1], meta={}, data_iter=Iterator())
    ckpt.close()
    assert step == 1 and found == [3]
    assert_same(state, states[1])
    assert sum("left in place" in r.message for r in caplog.records) == 2  # steps 3 and 2
    assert snapshot(tmp_path) == before


def test_read_only_on_a_run_without_checkpoints_creates_nothing(tmp_path):
    ckpt = Checkpoints(str(tmp_path / "run"), read_only=True)
    assert ckpt.latest_meta() is None
    ckpt.close()
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------------------ unwritable


def _mount_tmpfs(path, options):
    """A tmpfs at `path` (root only); skips the test where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def _unmount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_checkpoints(tmp_path):
    """A run directory whose checkpoints/ is read-only: a chmod for a normal user, a read-only
    tmpfs for root (who writes through any mode bits)."""
    path = tmp_path / "run" / "checkpoints"
    if os.geteuid() != 0:
        path.mkdir(parents=True)
        path.chmod(0o555)
        yield tmp_path / "run"
        path.chmod(0o755)
        return
    _mount_tmpfs(path, "ro,size=1m")
    yield tmp_path / "run"
    _unmount(path)


def test_a_read_only_checkpoint_directory_fails_at_once(read_only_checkpoints):
    start = time.monotonic()
    with pytest.raises(CheckpointWriteError) as info:
        Checkpoints(str(read_only_checkpoints))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert str(read_only_checkpoints / "checkpoints") in message
    assert "read-only or not writable" in message and "train.run_dir" in message
    assert info.value.errno in (errno.EROFS, errno.EACCES)


def test_a_full_disk_fails_with_a_clear_error_and_leaves_nothing_to_resume(tmp_path):
    run = tmp_path / "run"
    _mount_tmpfs(run / "checkpoints", "size=512k")
    try:
        ckpt = Checkpoints(str(run), async_save=True)
        small = make_state(1, n=4096)  # 16 KiB of float32
        ckpt.save(1, small, meta={"done": False}, data_iter=Iterator())
        ckpt.wait()
        big = make_state(2, n=1 << 18)  # 1 MiB: does not fit
        with pytest.raises(CheckpointWriteError) as info:
            ckpt.save(2, big, meta={"done": False}, data_iter=Iterator())
            ckpt.wait()
        assert info.value.errno == errno.ENOSPC
        assert "disk is full" in str(info.value) and "step 2" in str(info.value)
        ckpt.close()
        assert sorted(os.listdir(run / "checkpoints")) == ["1"]  # no partial step 2 left
        ckpt = Checkpoints(str(run))
        assert ckpt.latest_meta()[0] == 1
        state, _ = ckpt.restore(1, abstract_like(small), data_iter=Iterator())
        ckpt.close()
        assert_same(state, small)
    finally:
        _unmount(run / "checkpoints")


def test_a_disk_already_full_fails_before_the_save_starts(tmp_path):
    run = tmp_path / "run"
    _mount_tmpfs(run / "checkpoints", "size=64k")
    try:
        with open(run / "checkpoints" / "filler", "wb") as f:
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        with pytest.raises(CheckpointWriteError, match="disk is full"):
            Checkpoints(str(run))
    finally:
        _unmount(run / "checkpoints")


def test_a_write_error_in_the_save_is_reported_with_the_step(tmp_path, monkeypatch):
    # No root needed: the data iterator file write fails as a full disk would.
    def no_space(self, directory, args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    ckpt = Checkpoints(str(tmp_path), async_save=False)
    ckpt.save(1, make_state(1), meta={"done": False}, data_iter=Iterator())
    monkeypatch.setattr(DataIterHandler, "save", no_space)
    with pytest.raises(CheckpointWriteError, match="step 2 .*disk is full"):
        ckpt.save(2, make_state(2), meta={"done": False}, data_iter=Iterator())
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


# ------------------------------------------------------------------------------ sharding


def test_checksums_do_not_depend_on_sharding_or_device_count(tmp_path):
    # Saved sharded over 8 devices, restored on 1 and on another 8-device layout (a subprocess:
    # this process's device count is fixed).
    script = f"""
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import sys
sys.path.insert(0, {HERE!r})
from test_checkpoint import Iterator, make_state, assert_same
from rsa_jax.training._checkpoint import Checkpoints, abstract_like
from rsa_jax.training._checksum import tree_checksums

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
def place(tree, spec):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)
state = make_state(5)
sharded = place(state, lambda x: P("a", "b") if x.ndim == 2 else P())
assert tree_checksums(sharded) == tree_checksums(state)
ckpt = Checkpoints({str(tmp_path)!r}, async_save=True)
ckpt.save(1, sharded, meta={{}}, data_iter=Iterator())
ckpt.close()
ckpt = Checkpoints({str(tmp_path)!r})
other = place(state, lambda x: P("b", None) if x.ndim == 2 else P())
restored, _ = ckpt.restore(1, abstract_like(other), data_iter=None)
assert restored["params"]["w"].sharding.spec == P("b", None)
assert_same(restored, state)
single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[3])), state)
restored, _ = ckpt.restore(1, single, data_iter=None)
assert_same(restored, state)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
