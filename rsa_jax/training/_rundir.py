"""A run directory that one trainer owns and that stands alone.

- `RunDir(path)`: the layout. Every file and folder name of a run directory is written here,
  once (`config.json`, `checkpoints/`, `metrics.jsonl`, `tensorboard/`, `stages/<i>`,
  `corrupt/`, `eval.json`, `.lock`); everything else asks it for paths.
- `CheckpointMeta`: the typed record each checkpoint carries (stage, stage step, done, PRNG key
  data, the resolved config). The checkpoint's config is the run's truth: resume compares
  against it and `load_policy` builds the model from it; `config.json` is its readable copy,
  written when the run's first checkpoint is (so a run that fails before that leaves none).
- `resolve_source(text)`: the one reader of `RUN`, `RUN@STAGE` (index or name) and Hugging Face
  directories, for export, eval, merge and the CLI's argument checks.
- `RunLock(run_dir)`: an exclusive `fcntl.flock` on `<run_dir>/.lock`. The kernel releases it
  when the holder exits however it exits (SIGKILL, a crash), so it is never stale; the file
  names the holder (pid, host, start time, command) for the refusal message. On `gs://` it is a
  renewed lease written with generation-conditional requests instead (`_objstore.Lease`). Only
  process 0 of a multi-process run takes it (the others write through Orbax under its
  coordination); `lock_run_dir` makes every process fail together when it cannot.
- Paths: a run directory may be a local path or a `gs://` URL; every file call here goes through
  `etils.epath`, so both work alike (`s3://` is refused: `_objstore.check_supported`).
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
import math
import os
import re
import socket
import sys
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from rsa_jax.config import COSMETIC, Config, ConfigError, keys_of_kind
from rsa_jax.config import RESUME_IGNORED as RESUME_IGNORED_KIND
from rsa_jax.training._objstore import (
    Lease,
    LeaseHeld,
    check_supported,
    describe,
    is_remote,
    live,
    read_lease,
)

_CANDIDATE = re.compile(r"^(\d+)_(\d+)$")


class RunDir:
    """The layout of a run directory: the one place its names are spelled.

    >>> run = RunDir("runs/rsa")
    >>> run.checkpoints, run.stage_policy(0)
    ('/.../runs/rsa/checkpoints', '/.../runs/rsa/stages/0')
    """

    CONFIG = "config.json"
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tensorboard"
    STAGES = "stages"
    CORRUPT = "corrupt"
    EVAL = "eval.json"
    LOCK = ".lock"
    CANDIDATES = "candidates"  # candidates/<stage>_<step>/: checkpoint.candidates_every

    def __init__(self, path: str):
        text = str(path)
        if is_remote(text):  # never a local folder named "gs:"
            try:
                check_supported(text)
            except ValueError as e:
                raise RunDirError(f"run directory {e}") from None
            self.path = text.rstrip("/")
        elif "://" in text:
            raise RunDirError(
                f"run directory {text}: only local paths and gs:// URLs are supported "
                "(docs/run_directory.md)"
            )
        else:
            self.path = os.path.abspath(os.path.expanduser(text))
        self.remote = is_remote(self.path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def __str__(self) -> str:
        return self.path

    def _join(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    @property
    def config_file(self) -> str:
        return self._join(self.CONFIG)

    @property
    def checkpoints(self) -> str:
        return self._join(self.CHECKPOINTS)

    @property
    def metrics_file(self) -> str:
        return self._join(self.METRICS)

    @property
    def tensorboard(self) -> str:
        return self._join(self.TENSORBOARD)

    @property
    def corrupt(self) -> str:
        return self._join(self.CORRUPT)

    @property
    def eval_file(self) -> str:
        return self._join(self.EVAL)

    @property
    def lock_file(self) -> str:
        return self._join(self.LOCK)

    def stage_policy(self, index: int) -> str:
        """Where the policy a (non-final) stage ended with is kept: checkpoint retention never
        deletes it, so RSA(P) can merge the stage-1 and final policies of one run."""
        return self._join(self.STAGES, str(index))

    def candidate(self, index: int, step: int) -> str:
        """Where the policy at `step` of stage `index` is kept as a frontier candidate
        (`checkpoint.candidates_every`): retention never deletes it, like `stage_policy`."""
        return self._join(self.CANDIDATES, f"{index}_{step}")

    def candidates(self) -> list[tuple[int, int]]:
        """[(stage index, step)] of the run's finished candidates, in training order (an
        interrupted write leaves Orbax's temporary name, which is not listed)."""
        root = epath.Path(self._join(self.CANDIDATES))
        if not root.is_dir():
            return []
        found = [
            m.groups()
            for name in _names(root)
            if (m := _CANDIDATE.match(name)) and (not self.remote or finished(root / name))
        ]
        return sorted((int(i), int(s)) for i, s in found)

    # -- what is there ------------------------------------------------------------------
    def has_config(self) -> bool:
        return epath.Path(self.config_file).is_file()

    def has_checkpoints(self) -> bool:
        """A checkpoint was written here (a listed step; Orbax's temporary directories of saves
        that never finished do not count)."""
        directory = epath.Path(self.checkpoints)
        return directory.is_dir() and any(n.isdigit() for n in _names(directory))

    def is_hf_model(self) -> bool:
        """A Hugging Face model directory (safetensors weights), not a run directory."""
        root = epath.Path(self.path)
        return (
            root.is_dir()
            and not epath.Path(self.checkpoints).is_dir()
            and any(f.endswith(".safetensors") for f in _names(root))
        )

    # -- config.json --------------------------------------------------------------------
    def read_config(self) -> dict | None:
        return saved_config(self.path)

    def write_config(self, text: str) -> None:
        write_config(self.path, text)

    # -- the lock -----------------------------------------------------------------------
    def lock(self) -> RunLock:
        """Process 0 takes the run's lock, every process fails together when it cannot."""
        return lock_run_dir(self.path)

    def holder(self) -> str | None:
        """Who trains in this directory now ("pid 12 on host h, started ..."), or None. Never
        takes the lock nor creates anything (read-only directories work)."""
        if self.remote:
            record, _ = read_lease(self.lock_file)
            return describe(record or {}) if live(record) else None
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:
            return None
        finally:
            os.close(fd)  # closing releases a shared lock taken here
        return None


LOCK_FILE = RunDir.LOCK


def finished(path) -> bool:
    """An Orbax checkpoint directory whose write completed. On disk Orbax renames a temporary
    directory when done, so existing is enough; on object storage it writes into the final
    name and adds a commit marker last, which Orbax's own check looks for."""
    path = epath.Path(path)
    if not is_remote(path):
        return path.is_dir()
    import orbax.checkpoint as ocp

    return path.is_dir() and ocp.utils.is_checkpoint_finalized(path)


def _names(directory: epath.Path) -> list[str]:
    """The names in a directory (a prefix on object storage)."""
    return [p.name for p in directory.iterdir()]


# Keys that may change between a run and its resume: those declared RESUME_IGNORED or COSMETIC
# next to their field in `rsa_jax.config` (paths, logging, checkpoint cadence, the mesh, memory
# knobs: what is printed, saved or reached differently, never the trained values).
RESUME_IGNORED: tuple[str, ...] = tuple(keys_of_kind(RESUME_IGNORED_KIND, COSMETIC))


class RunDirError(RuntimeError):
    """The run directory cannot be used (held by another trainer, unwritable, unreadable)."""


class ConfigMismatch(ConfigError):
    """A run directory's checkpoints were trained under another config."""


# ----------------------------------------------------------------------------------- lock


class RunLock:
    """Exclusive ownership of a run directory for the lifetime of a trainer.

        with RunLock("runs/rsa"):       # RunDirError at once if another trainer holds it
            train(config)

    `enabled=False` (processes other than 0) makes it a no-op. Works on local filesystems and on
    NFS (Linux maps flock to NFS byte-range locks); on filesystems without locking (some FUSE
    mounts, e.g. gcsfuse) flock may succeed for everyone, and the lock protects nothing. On a
    `gs://` run directory it is a renewed lease (`_objstore.Lease`): see docs/run_directory.md
    for what that guarantees.
    """

    def __init__(self, run_dir: str, *, enabled: bool = True):
        layout = RunDir(run_dir)
        self.run_dir = layout.path
        self.path = layout.lock_file
        self.enabled = enabled
        self._fd: int | None = None
        self._lease = Lease(self.path) if layout.remote else None

    def acquire(self) -> RunLock:
        if not self.enabled:
            return self
        if self._lease is not None:
            try:
                self._lease.acquire()
            except LeaseHeld as e:
                raise RunDirError(
                    f"run directory {self.run_dir} is in use by another trainer ({e}; lease "
                    f"{self.path}). Wait for it to finish or for its lease to expire, or use "
                    "another train.run_dir"
                ) from None
            except OSError as e:
                raise RunDirError(
                    f"cannot use run directory {self.run_dir}: writing the lease {self.path} "
                    f"failed ({e}); check the bucket, its permissions and credentials"
                ) from e
            return self
        if self._fd is not None:
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
        if self._lease is not None:
            self._lease.release()
            return
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
        return self._lease.held if self._lease is not None else self._fd is not None

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
                f"run directory {RunDir(run_dir).path} is in use by another trainer or "
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
        if not _ignored(k, ignore) and not _same(a.get(k, _ABSENT), b.get(k, _ABSENT))
    )


def _same(x: Any, y: Any) -> bool:
    """Equal values; two NaNs count as the same value (NaN != NaN would refuse every rerun of
    a config that holds one, and the mismatch would show `NaN -> NaN`)."""
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def mismatch_message(run_dir: str, saved: dict, new: dict, keys: list[str]) -> str:
    """Which keys differ, both values and both ways out. The first line says it all (the CLI
    prints first lines only): up to 3 keys there, every key on the lines below."""
    a, b = _flatten(saved), _flatten(new)
    shown = [f"{k}: {_show(a.get(k, _ABSENT))} -> {_show(b.get(k, _ABSENT))}" for k in keys]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return (
        f"{run_dir} holds a run trained with another config; {len(keys)} key(s) differ "
        f"(saved -> now): {'; '.join(shown[:3])}{more}. To start afresh, use another "
        f"train.run_dir or delete {run_dir}; to resume with the new values anyway, add "
        "train.resume=force\n" + "\n".join(f"  {line}" for line in shown)
    )


def saved_config(run_dir: str) -> dict | None:
    """The config a run directory was started with (`config.json`), or None for a new run."""
    path = RunDir(run_dir).config_file
    try:
        text = epath.Path(path).read_text()
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
    """Writes `<run_dir>/config.json` atomically (a temporary file renamed over it; on object
    storage one upload, which replaces the object whole or not at all), so a crash never leaves
    a half-written file that would block the next resume. Process 0 only."""
    path = RunDir(run_dir).config_file
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_resume(
    run_dir: str, new: dict, *, force: bool = False, saved: dict | None = None
) -> list[str]:
    """Compares `new` (a config dict) with `saved`, the config the run's checkpoints were
    trained with (the trainer passes the newest checkpoint's own; default: `config.json`).

    Returns the differing keys (empty for a new run or a match). Raises ConfigMismatch when
    some differ, unless `force`, in which case the caller logs them and resumes anyway.
    """
    if saved is None:
        saved = saved_config(run_dir)
    if saved is None:
        return []
    keys = config_diff(saved, new)
    if keys and not force:
        raise ConfigMismatch(mismatch_message(run_dir, saved, new, keys))
    return keys


# ------------------------------------------------------------------------ checkpoint metadata


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a run's checkpoint says about itself, beside its arrays.

    `stage`: the stage index; `stage_step`: optimizer steps of that stage taken; `done`: the
    stage's final checkpoint; `rng`: the run's PRNG key data; `config`: the resolved config the
    run was trained with (`to_json`'s structure; what resume compares and loading builds).
    """

    stage: int
    stage_step: int
    done: bool
    rng: list
    config: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, meta: dict, where: str) -> CheckpointMeta:
        """The record from a checkpoint's metadata; RunDirError naming `where` and the missing
        or mistyped field otherwise."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        types = {"stage": int, "stage_step": int, "done": bool, "rng": list, "config": dict}
        values = {}
        for name in fields:
            if name not in meta:
                raise RunDirError(f"{where}: checkpoint metadata has no {name!r}")
            if not isinstance(meta[name], types[name]):
                raise RunDirError(
                    f"{where}: checkpoint metadata field {name!r} should be "
                    f"{types[name].__name__}, got {meta[name]!r}"
                )
            values[name] = meta[name]
        return cls(**values)

    def final(self, n_stages: int) -> bool:
        """The run's last stage finished."""
        return self.done and self.stage == n_stages - 1


# ----------------------------------------------------------------------------------- paths


def _absolute(path: str) -> str:
    if not path or is_remote(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(config: Config) -> Config:
    """The config with `model.path` (unless "tiny"), `data.path` and every stage's `data_path`
    made absolute (relative to the current directory; `~` expanded).

    The tokenizer is loaded from `model.path`, so this also pins the tokenizer's location.
    Raises ConfigError naming the path when a local model directory does not exist or is not a
    directory: model paths are never looked up on a hub.
    """
    model = config.model
    if model.path != "tiny":
        if is_remote(model.path):
            raise ConfigError(
                f"model.path: {model.path}: models are read from local directories only; copy "
                "it to local disk (gcloud storage cp -r) and pass that path"
            )
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
    for key, value in [("data.path", config.data.path)] + [
        (f"stages.{i}.data_path", s.data_path) for i, s in enumerate(config.stages)
    ]:
        if is_remote(value):
            raise ConfigError(
                f"{key}: {value}: data files are read from local paths only; copy the file to "
                "local disk and pass that path"
            )
    data = dataclasses.replace(config.data, path=_absolute(config.data.path))
    stages = [dataclasses.replace(s, data_path=_absolute(s.data_path)) for s in config.stages]
    return dataclasses.replace(config, model=model, data=data, stages=stages)


# ----------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    """A policy source resolved: a run directory (optionally one of its stages) or a Hugging
    Face model directory. `text`: as the user gave it."""

    text: str
    path: str
    kind: str  # "run" or "hf"
    stage: str | None = None

    @property
    def run(self) -> RunDir:
        return RunDir(self.path)


class SourceError(FileNotFoundError):
    """A model/policy argument that is not a usable run directory or Hugging Face directory."""


def split_source(source: str) -> tuple[str, str | None]:
    """`RUN@STAGE` -> (RUN, STAGE); anything else (a path that exists with its `@`) -> (source,
    None)."""
    path, sep, stage = source.rpartition("@")
    if sep and path and stage and epath.Path(path).is_dir() and not epath.Path(source).exists():
        return path, stage
    return source, None


def resolve_source(text: str, *, what: str = "model", hf_ok: bool = True) -> Source:
    """`RUN` (a run's final policy), `RUN@STAGE` (the policy stage STAGE, an index or a name,
    ended with) or a Hugging Face directory (`hf_ok`). Raises SourceError saying what the path
    is and what was expected, and ValueError naming the run's stages for an unknown STAGE."""
    path, stage = split_source(text)
    expected = "a run directory (train.run_dir), RUN@STAGE" + (
        " or a Hugging Face model directory" if hf_ok else ""
    )
    try:
        run = RunDir(path)
    except RunDirError as e:
        raise SourceError(f"{what} {text!r}: {e}") from None
    if not epath.Path(run.path).exists():
        raise SourceError(f"{what} {text!r} does not exist: pass {expected}")
    if not epath.Path(run.path).is_dir():
        raise SourceError(f"{what} {text!r} is not a directory: pass {expected}")
    if run.is_hf_model():
        if not hf_ok:
            raise SourceError(
                f"{what} {path!r} is a Hugging Face model directory, not a run directory: pass "
                "the train.run_dir of a run that `rsa-jax train` started"
            )
        if stage is not None:
            raise SourceError(
                f"{what} {text!r}: {path} is a Hugging Face model directory; @STAGE applies to "
                "run directories"
            )
        return Source(text, run.path, "hf")
    if not epath.Path(run.checkpoints).is_dir():
        if run.has_config():
            raise SourceError(
                f"{what} {path!r} has no {RunDir.CHECKPOINTS}/ yet: train it first (rsa-jax "
                f"train CONFIG train.run_dir={path})"
            )
        neither = f"(no {RunDir.CONFIG}, no {RunDir.CHECKPOINTS}/)"
        if hf_ok:
            neither = (
                f"is neither a run directory {neither} nor a Hugging Face model directory "
                "(no *.safetensors)"
            )
        else:
            neither = f"is not a run directory {neither}"
        raise SourceError(f"{what} {path!r} {neither}: pass {expected}")
    if stage is not None:
        saved = run.read_config()
        names = [s.get("name") for s in (saved or {}).get("stages", [])]
        base = stage.partition(":")[0]  # STAGE:STEP names a candidate kept along training
        if names and not (base in names or (base.isdigit() and int(base) < len(names))):
            raise ValueError(f"{what} {text!r}: no stage {stage!r}; the run's stages are {names}")
    return Source(text, run.path, "run", stage)
