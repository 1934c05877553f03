"""Orbax checkpoints of a run: policy + optimizer state, reference (when it is a trained stage),
the data iterator's position, PRNG key, stage index and the resolved config.

Orbax writes each step into a temporary directory and renames it when complete, so a partial
checkpoint is never listed. A listed checkpoint that fails to restore (corrupt files) is moved
aside to `corrupt/` (never overwritten or deleted) and the previous one is used, with a warning.

Integrity: at save time the metadata records, for every saved array, its shape, dtype and a
checksum of its values (`tree_checksums`, computed on the device arrays before the write starts,
so async saves are covered), a sha256 of the metadata itself, and each data iterator file gets a
sha256 sidecar. Restore recomputes them from what it read: any difference (flipped bytes in a
data file, a truncated or edited file) is a corrupt checkpoint. Arrays of another shape or dtype
than the restore target are not corruption but another model config: `CheckpointMismatch`,
nothing is set aside. Checkpoints written before checksums existed restore unverified (warning).

Read-only (`read_only=True`, for export/eval/merge): nothing in the run directory is created,
moved or deleted; a corrupt checkpoint is skipped with a warning and left where it is.

Writes that cannot happen fail at once with `CheckpointWriteError` (a probe file is written and
removed before each save: a read-only or unwritable directory or a full disk is reported before
Orbax starts, instead of its background thread failing and the save waiting 5 minutes on a
signal), and an Orbax write error (disk full mid-write) is reported the same way, its temporary
directory removed. Neither leaves anything a resume would list.

Several processes: Orbax coordinates the array saves (each process writes its shards, process 0
the metadata and the final rename). The data iterator's state is per process, so each process
writes `data_iter/process_<i>-of-<n>.json` (`DataIterHandler`). The pipeline's state is the
global batch index, the same on every process and for any process count, so a checkpoint
written by n processes resumes with m: a process without its own file takes the state all the
files agree on (and refuses if they disagree). Every decision that sets a checkpoint aside or
stops a save is agreed by all processes (each checks what it read or wrote; one failure fails
all), so no process goes on alone into a collective.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from rsa_jax.training._checksum import tree_checksums, tree_layout
from rsa_jax.training._rundir import RunDir

log = logging.getLogger(__name__)

# Key of the integrity record inside the saved metadata (stripped from what `latest_meta` returns).
INTEGRITY = "integrity"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that cannot be trusted; it was set aside (or, read-only, skipped)."""

    def __init__(self, step: int, reason: str = ""):
        detail = f": {reason}" if reason else ""
        super().__init__(f"checkpoint {step} could not be restored{detail}")
        self.step = step


class CheckpointMismatch(ValueError):
    """The checkpoint holds other arrays (names, shapes, dtypes) than the restore target: it was
    written under another model config. Nothing is set aside."""


class CheckpointWriteError(OSError):
    """A checkpoint cannot be written (permissions, read-only filesystem, full disk)."""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


class DataIterHandler(ocp.CheckpointHandler):
    """Orbax handler for Grain dataset iterators: one JSON state file per process, with a sha256
    sidecar (`process_<i>-of-<n>.sha256`) checked on restore.

    Same file names as `grain.checkpoint.CheckpointHandler` (which this replaces because it
    requires the saving and restoring process counts to match).
    """

    def save(self, directory: epath.Path, args: DataIterSave) -> None:
        i, n = jax.process_index(), jax.process_count()
        text = json.dumps(args.item.get_state())
        (directory / f"process_{i}-of-{n}.json").write_text(text)
        (directory / f"process_{i}-of-{n}.sha256").write_text(_sha256(text))

    @staticmethod
    def _read(file: epath.Path):
        text = file.read_text()
        sidecar = file.parent / (file.name.removesuffix(".json") + ".sha256")
        if sidecar.exists() and sidecar.read_text().strip() != _sha256(text):
            raise ValueError(f"{file}: sha256 differs from {sidecar.name} (corrupt file)")
        return json.loads(text)

    def restore(self, directory: epath.Path, args: DataIterRestore):
        i, n = jax.process_index(), jax.process_count()
        own = directory / f"process_{i}-of-{n}.json"
        if own.exists():
            state = self._read(own)
        else:
            files = sorted(directory.glob("process_*-of-*.json"))
            if not files:
                raise FileNotFoundError(f"{directory}: no data iterator state")
            states = {f.name: self._read(f) for f in files}
            state = next(iter(states.values()))
            if any(s != state for s in states.values()):
                raise ValueError(
                    f"{directory}: saved by {len(files)} processes whose iterator states differ "
                    f"({states}); cannot resume with {n} process(es)"
                )
            log.info("data iterator state from %s restored in process %d of %d", files[0], i, n)
        args.item.set_state(state)
        if hasattr(args.item, "start_prefetch"):
            args.item.start_prefetch()
        return args.item

    def metadata(self, directory: epath.Path) -> None:
        return None

    def structure(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
    item: Any


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds in every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
    return bool(np.all(flags))


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind an Orbax/TensorStore failure, if one can be found."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        error = current
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        text = str(error)
        for code, marker in (
            (errno.ENOSPC, "No space left on device"),
            (errno.EROFS, "Read-only file system"),
            (errno.EACCES, "Permission denied"),
            (errno.EDQUOT, "Disk quota exceeded"),
        ):
            if marker in text:
                return OSError(code, os.strerror(code))
        current = error.__cause__ or error.__context__
    return None


def _hint(error: OSError | None) -> str:
    if error is None:
        return ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "; the disk is full: free space, lower checkpoint.keep, or use another train.run_dir"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            "; the directory is read-only or not writable by this user: fix its permissions or "
            "use another train.run_dir"
        )
    return ""


class Checkpoints:
    """A CheckpointManager on `<run_dir>/checkpoints` with keep-N, optional async saves, integrity
    checks, and a read-only mode that never changes the run directory."""

    def __init__(
        self, run_dir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
    ):
        self.layout = RunDir(run_dir)
        self.run_dir = self.layout.path
        self.directory = self.layout.checkpoints
        self.keep = keep
        self.async_save = async_save and not read_only
        self.read_only = read_only
        self._skipped: set[int] = set()  # read-only: corrupt steps left in place
        self._pending: int | None = None  # step of an async save not yet known to be complete
        if not read_only:
            self._check_writable()
        self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(
            # Read-only: nothing is ever saved or deleted (Orbax warns if these are given).
            max_to_keep=None if self.read_only else self.keep,
            save_interval_steps=0 if self.read_only else 1,
            enable_async_checkpointing=self.async_save,
            create=not self.read_only,
            read_only=self.read_only,
            # Temporary directories of saves that were killed: never listed, only taking space.
            # Safe because one trainer owns a run directory (RunLock).
            cleanup_tmp_directories=not self.read_only,
        )
        absl = logging.getLogger("absl")
        level = absl.level
        if self.read_only:  # Orbax warns that the directory is read-only: that is the point
            absl.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl.setLevel(level)

    # ----------------------------------------------------------------------------- writing

    def _write_error(self, what: str, error: OSError | None, step: int | None = None):
        where = f"checkpoint step {step} in " if step is not None else ""
        if error is None:
            cause = "another process could not write (see its log)"
        else:
            name = errno.errorcode.get(error.errno, "") if error.errno else ""
            cause = f"{error.strerror or error}" + (f" ({name})" if name else "")
        return CheckpointWriteError(
            error.errno if error is not None and error.errno else errno.EIO,
            f"{what} {where}{self.directory}: {cause}{_hint(error)}",
        )

    def _check_writable(self, step: int | None = None) -> None:
        """Creates the directory, writes, syncs and removes a 4 KiB probe file (per process);
        raises in every process when any of them cannot."""
        probe = os.path.join(self.directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
        error = None
        try:
            if self.layout.remote:  # one upload; no directories, no fsync on object storage
                epath.Path(probe).write_bytes(b"\0" * 4096)
            else:
                os.makedirs(self.directory, exist_ok=True)
                with open(probe, "wb") as f:
                    f.write(b"\0" * 4096)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            error = e
        finally:
            if epath.Path(probe).exists():
                try:
                    epath.Path(probe).unlink()
                except OSError as e:
                    error = error or e
        if not _all_processes(error is None):
            raise self._write_error("cannot write", error, step) from error

    def _remove_partial(self, step: int) -> None:
        """Deletes the temporary directory of a failed save (never listed as a step; it only
        takes space). With several processes Orbax's start-up cleanup does it instead."""
        if jax.process_count() > 1:
            return
        directory = epath.Path(self.directory)
        for path in directory.iterdir() if directory.is_dir() else []:
            if path.name.startswith(f"{step}.orbax-checkpoint-tmp"):
                if self.layout.remote:
                    path.rmtree(missing_ok=True)
                else:
                    shutil.rmtree(str(path), ignore_errors=True)

    def _failed_write(self, step: int, error: Exception) -> CheckpointWriteError:
        self._remove_partial(step)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        os_error = _os_error(error)
        detail = (
            self._write_error("cannot save", os_error, step).args[1]
            if os_error is not None
            else f"cannot save checkpoint step {step} in {self.directory}"
        )
        return CheckpointWriteError(
            os_error.errno if os_error is not None else errno.EIO, f"{detail} ({first})"
        )

    def save(self, step: int, state, *, meta: dict, data_iter, reference=None) -> None:
        """Starts writing `step` (returns before the write ends when async). The checksums are
        computed here, from the arrays as they are now, so the caller may donate them next."""
        if self.read_only:
            raise RuntimeError(f"{self.directory}: opened read-only, cannot save step {step}")
        self._finish_pending()
        self._check_writable(step)
        integrity: dict[str, Any] = {"state": self._records(state)}
        items: dict[str, Any] = dict(
            state=ocp.args.StandardSave(state),
            data_iter=DataIterSave(data_iter),
        )
        if reference is not None:
            integrity["reference"] = self._records(reference)
            items["reference"] = ocp.args.StandardSave(reference)
        integrity["meta_sha256"] = _sha256(_canonical(meta))
        items["meta"] = ocp.args.JsonSave({**meta, INTEGRITY: integrity})
        try:
            self.manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - reported with the step and directory
            raise self._failed_write(step, e) from e
        self._pending = step

    @staticmethod
    def _records(tree) -> dict[str, dict]:
        layout = tree_layout(tree)
        for path, value in tree_checksums(tree).items():
            layout[path]["checksum"] = value
        return layout

    def _finish_pending(self) -> None:
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an async write that failed in the background
            if step is None:
                raise
            raise self._failed_write(step, e) from e

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self.manager.close()

    # ----------------------------------------------------------------------------- reading

    def _steps(self) -> list[int]:
        return sorted((s for s in self.manager.all_steps() if s not in self._skipped), reverse=True)

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose metadata reads and matches its checksum;
        unreadable ones are set aside (skipped when read-only)."""
        while True:
            steps = self._steps()
            if not steps:
                return None
            step = steps[0]
            meta, error = None, None
            try:
                meta = self._read_meta(step)[0]
            except Exception as e:  # noqa: BLE001 - any failure means unusable
                error = e
            if _all_processes(error is None) and meta is not None:
                return step, meta
            self._set_aside(step, error or RuntimeError("another process could not read it"))

    def _read_meta(self, step: int) -> tuple[dict, dict | None]:
        """(meta, integrity record or None for a checkpoint written without one)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        integrity = meta.pop(INTEGRITY, None)
        if integrity is not None and integrity.get("meta_sha256") != _sha256(_canonical(meta)):
            raise ValueError("the metadata does not match its checksum")
        return meta, integrity

    def restore(self, step: int, abstract_state, *, data_iter, abstract_reference=None):
        """Restores into the given abstract (sharded ShapeDtypeStruct) trees; the iterator in place.

        Returns (state, reference or None). Raises CorruptCheckpoint after setting a corrupt step
        aside (unreadable, or a checksum differs), CheckpointMismatch (nothing set aside) when the
        saved arrays do not have the target's names, shapes and dtypes.
        """
        try:
            _, integrity = self._read_meta(step)
            error = None
        except Exception as e:  # noqa: BLE001
            integrity, error = None, e
        if not _all_processes(error is None):
            self._set_aside(step, error or RuntimeError("another process could not read it"))
            raise CorruptCheckpoint(step, "metadata unreadable") from error
        targets = {"state": abstract_state}
        if abstract_reference is not None:
            targets["reference"] = abstract_reference
        if integrity is None:
            log.warning(
                "checkpoint %d in %s has no checksums (written by an older rsa_jax): restored "
                "unverified",
                step,
                self.directory,
            )
        else:
            self._check_layout(step, integrity, targets)

        items: dict[str, Any] = {name: ocp.args.StandardRestore(t) for name, t in targets.items()}
        if data_iter is not None:
            items["data_iter"] = DataIterRestore(data_iter)
        out, error = None, None
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            error = e
        if not _all_processes(error is None):
            self._set_aside(step, error or RuntimeError("another process could not read it"))
            raise CorruptCheckpoint(step, "unreadable") from error
        assert out is not None  # every process restored
        if integrity is not None:
            bad = [
                f"{name}{path}"
                for name in targets
                for path, value in tree_checksums(out[name]).items()
                if integrity[name][path]["checksum"] != value
            ]
            if bad:  # the same list in every process: the checksums are global
                reason = f"checksum differs for {len(bad)} array(s): {', '.join(bad[:5])}"
                self._set_aside(step, ValueError(reason))
                raise CorruptCheckpoint(step, reason)
        return out["state"], out.get("reference") if abstract_reference is not None else None

    def _check_layout(self, step: int, integrity: dict, targets: dict) -> None:
        diffs = []
        for name, target in targets.items():
            saved = {p: (r["shape"], r["dtype"]) for p, r in integrity.get(name, {}).items()}
            wanted = {p: (r["shape"], r["dtype"]) for p, r in tree_layout(target).items()}
            for path in sorted(saved.keys() | wanted.keys()):
                if saved.get(path) != wanted.get(path):
                    fmt = lambda v: "absent" if v is None else f"{v[1]}{v[0]}"  # noqa: E731
                    diffs.append(
                        f"{name}{path}: saved {fmt(saved.get(path))}, "
                        f"expected {fmt(wanted.get(path))}"
                    )
        if diffs:
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise CheckpointMismatch(
                f"checkpoint {step} in {self.directory} holds other arrays than this run's "
                f"model: {'; '.join(diffs[:5])}{more}. It was written under another model config "
                f"(compare the run's {RunDir.CONFIG}); use another train.run_dir to start afresh"
            )

    def _set_aside(self, step: int, error: Exception) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if self.read_only:
            log.warning(
                "checkpoint step %d in %s cannot be restored (%s); skipped (read-only: left in "
                "place), using the previous one",
                step,
                self.directory,
                reason,
            )
            self._skipped.add(step)
            return
        source = os.path.join(self.directory, str(step))
        target_dir = self.layout.corrupt
        target = os.path.join(target_dir, f"{step}")
        n = 0
        while epath.Path(target).exists():
            n += 1
            target = os.path.join(target_dir, f"{step}.{n}")
        log.warning(
            "checkpoint step %d in %s cannot be restored (%s); moved to %s, using the previous one",
            step,
            self.directory,
            reason,
            target,
        )
        self.manager.close()
        # One process moves it; every process reaches this point for the same step (they agree
        # on every set-aside decision), and waits until the move is done before listing again.
        if jax.process_index() == 0:
            if self.layout.remote:  # no rename of a prefix: copy every object, then delete
                _copy_tree(epath.Path(source), epath.Path(target))
                epath.Path(source).rmtree()
            else:
                os.makedirs(target_dir, exist_ok=True)
                shutil.move(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"rsa_jax set aside checkpoint {step}")
        self._open()


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    for path in source.iterdir():
        if path.is_dir():
            _copy_tree(path, target / path.name)
        else:
            target.mkdir(parents=True, exist_ok=True)
            path.copy(target / path.name)


def abstract_like(tree):
    """ShapeDtypeStructs carrying each array's sharding (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
