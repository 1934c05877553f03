"""A run directory that one trainer owns and that stands alone.

- `RunLock(run_dir)`: an exclusive `fcntl.flock` on `<run_dir>/.lock`. The kernel releases it
  when the holder exits however it exits (SIGKILL, a crash), so it is never stale; the file
  names the holder (pid, host, start time, command) for the refusal message. Only process 0 of a
  multi-process run takes it (the others write through Orbax under its coordination);
  `lock_run_dir` makes every process fail together when it cannot.
- `config_diff(saved, new)`: the dotted keys whose values differ between the config a run was
  started with and the one it is resumed with, leaving out `RESUME_IGNORED` (paths, logging,
  checkpoint cadence, device layout and memory knobs: settings that do not change what is
  trained). `check_resume(run_dir, new)` raises `ConfigMismatch` listing them.
- `absolute_paths(config)`: model and data paths made absolute before the config is written to
  `config.json`, so `rsa-jax eval RUN` and `export` work from any working directory; a local
  model path that does not exist is an error naming it (never a hub download).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from rsa_jax.config import Config, ConfigError

LOCK_FILE = ".lock"

# Keys that may change between a run and its resume. Paths: the same files may be reached by
# another path (a moved dataset, a relative path from another directory). Logging and checkpoint
# cadence: what is printed or how often it is saved, never the trained values. The mesh: restore
# reshards onto another device count or layout (elastic resume). Memory knobs (remat, the fused
# head's chunk, gradient-accumulation microbatches, prefetch threads): the same maths computed in
# another order, so a run that ran out of memory can resume with other values.
RESUME_IGNORED: tuple[str, ...] = (
    "train.resume",
    "train.run_dir",
    "model.path",
    "data.path",
    "stages.*.data_path",
    "train.progress_bar",
    "train.log_every",
    "train.peak_tflops",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
    "checkpoint.candidates_every",
    "mesh.*",
    "model.remat",
    "train.chunk_size",
    "train.head",
    "optim.microbatches",
    "data.read_threads",
)


class RunDirError(RuntimeError):
    """The run directory cannot be used (held by another trainer, unwritable, unreadable)."""


class ConfigMismatch(ConfigError):
    """A run directory's checkpoints were trained under another config."""


# ----------------------------------------------------------------------------------- lock


class RunLock:
    """Exclusive ownership of a run directory for the lifetime of a trainer.

    >>> with RunLock("runs/rsa"):       # RunDirError at once if another trainer holds it
    ...     train(...)

    `enabled=False` (processes other than 0) makes it a no-op. Works on local filesystems and on
    NFS (Linux maps flock to NFS byte-range locks); on filesystems without locking (some FUSE
    mounts, e.g. gcsfuse) flock may succeed for everyone, and the lock protects nothing.
    """

    def __init__(self, run_dir: str, *, enabled: bool = True):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self.enabled = enabled
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if not self.enabled or self._fd is not None:
            return self
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(
                f"cannot use run directory {self.run_dir}: {e.strerror} "
                f"({errno.errorcode.get(e.errno or 0, e.errno)}); fix its permissions or free "
                "space, "
                "or use another train.run_dir"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"run directory {self.run_dir} is in use by another trainer ({holder}; lock "
                f"{self.path}). Wait for it to finish or stop it, or use another train.run_dir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # nobody holds it now: an empty file says so
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str) -> RunLock:
    """Process 0 takes `RunLock(run_dir)`; when it cannot, every process raises RunDirError
    together (the others would otherwise go on alone and wait in a collective). Release it (or
    use it as a context manager) when the run ends."""
    lock = RunLock(run_dir, enabled=jax.process_index() == 0)
    error = None
    try:
        lock.acquire()
    except RunDirError as e:
        error = e
    if jax.process_count() > 1:
        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise RunDirError(
                f"run directory {os.path.abspath(run_dir)} is in use by another trainer or "
                "unusable (see process 0's message)"
            )
    if error is not None:
        raise error
    return lock


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"


# ----------------------------------------------------------------------------------- config


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.learning_rate": 2e-5, "stages.1.beta": 0.1, ...}; dict keys and list indices."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict | list) and item:
            out.update(_flatten(item, name))
        else:
            out[name] = item
    return out


def _ignored(key: str, patterns: tuple[str, ...]) -> bool:
    """`key` equals or lies under a pattern; `*` in a pattern matches one key part."""
    parts = key.split(".")
    for pattern in patterns:
        want = pattern.split(".")
        if len(parts) >= len(want) and all(
            w == "*" or w == p for w, p in zip(want, parts, strict=False)
        ):
            return True
    return False


def config_diff(saved: dict, new: dict, *, ignore: tuple[str, ...] = RESUME_IGNORED) -> list[str]:
    """The dotted keys (sorted) whose values differ between two config dicts (`to_json`'s
    structure), without the `ignore` patterns. A key present on one side only differs (e.g.
    `stages.1.beta` when a two-stage run is resumed with a one-stage config)."""
    a, b = _flatten(saved), _flatten(new)
    return sorted(
        k
        for k in a.keys() | b.keys()
        if not _ignored(k, ignore) and a.get(k, _ABSENT) != b.get(k, _ABSENT)
    )


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def mismatch_message(run_dir: str, saved: dict, new: dict, keys: list[str]) -> str:
    a, b = _flatten(saved), _flatten(new)
    lines = [f"  {k}: {_show(a.get(k, _ABSENT))} -> {_show(b.get(k, _ABSENT))}" for k in keys]
    return (
        f"{run_dir} holds a run trained with another config; {len(keys)} key(s) differ "
        "(saved -> now):\n" + "\n".join(lines) + "\n"
        f"To start afresh, use another train.run_dir or delete {run_dir}; to resume with the new "
        "values anyway, add train.resume=force"
    )


def saved_config(run_dir: str) -> dict | None:
    """The config a run directory was started with (`config.json`), or None for a new run."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunDirError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); restore it or "
            "use another train.run_dir"
        ) from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def write_config(run_dir: str, text: str) -> None:
    """Writes `<run_dir>/config.json` atomically (a temporary file renamed over it), so a crash
    never leaves a half-written file that would block the next resume. Process 0 only."""
    path = os.path.join(run_dir, "config.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_resume(run_dir: str, new: dict, *, force: bool = False) -> list[str]:
    """Compares `new` (a config dict) with the run's saved `config.json`.

    Returns the differing keys (empty for a new run or a match). Raises ConfigMismatch when
    some differ, unless `force`, in which case the caller logs them and resumes anyway.
    """
    saved = saved_config(run_dir)
    if saved is None:
        return []
    keys = config_diff(saved, new)
    if keys and not force:
        raise ConfigMismatch(mismatch_message(run_dir, saved, new, keys))
    return keys


# ----------------------------------------------------------------------------------- paths


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def absolute_paths(config: Config) -> Config:
    """The config with `model.path` (unless "tiny"), `data.path` and every stage's `data_path`
    made absolute (relative to the current directory; `~` expanded).

    The tokenizer is loaded from `model.path`, so this also pins the tokenizer's location.
    Raises ConfigError naming the path when a local model directory does not exist or is not a
    directory: model paths are never looked up on a hub.
    """
    model = config.model
    if model.path != "tiny":
        path = _absolute(model.path)
        if not os.path.exists(path):
            raise ConfigError(
                f"model.path: {path} does not exist (a local Hugging Face directory with "
                "config.json, safetensors weights and tokenizer files; hub ids are not "
                "downloaded)"
            )
        if not os.path.isdir(path):
            raise ConfigError(f"model.path: {path} is not a directory")
        model = dataclasses.replace(model, path=path)
    data = dataclasses.replace(config.data, path=_absolute(config.data.path))
    stages = [dataclasses.replace(s, data_path=_absolute(s.data_path)) for s in config.stages]
    return dataclasses.replace(config, model=model, data=data, stages=stages)
