"""Orbax checkpoints of a run: policy + optimizer state, reference (when it is a trained stage),
the data iterator's position, PRNG key, stage index and the resolved config.

Orbax writes each step into a temporary directory and renames it when complete, so a partial
checkpoint is never listed. A listed checkpoint that fails to restore (corrupt files) is moved
aside to `corrupt/` (never overwritten or deleted) and the previous one is used, with a warning.

Several processes: Orbax coordinates the array saves (each process writes its shards, process 0
the metadata and the final rename). The data iterator's state is per process, so each process
writes `data_iter/process_<i>-of-<n>.json` (`DataIterHandler`). The pipeline's state is the
global batch index, the same on every process and for any process count, so a checkpoint
written by n processes resumes with m: a process without its own file takes the state all the
files agree on (and refuses if they disagree).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class DataIterHandler(ocp.CheckpointHandler):
    """Orbax handler for Grain dataset iterators: one JSON state file per process.

    Same file names as `grain.checkpoint.CheckpointHandler` (which this replaces because it
    requires the saving and restoring process counts to match).
    """

    def save(self, directory: epath.Path, args: DataIterSave) -> None:
        i, n = jax.process_index(), jax.process_count()
        (directory / f"process_{i}-of-{n}.json").write_text(json.dumps(args.item.get_state()))

    def restore(self, directory: epath.Path, args: DataIterRestore):
        i, n = jax.process_index(), jax.process_count()
        own = directory / f"process_{i}-of-{n}.json"
        if own.exists():
            state = json.loads(own.read_text())
        else:
            files = sorted(directory.glob("process_*-of-*.json"))
            if not files:
                raise FileNotFoundError(f"{directory}: no data iterator state")
            states = {f.name: json.loads(f.read_text()) for f in files}
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


class Checkpoints:
    """A CheckpointManager on `<run_dir>/checkpoints` with keep-N and optional async saves."""

    def __init__(self, run_dir: str, *, keep: int = 3, async_save: bool = True):
        self.run_dir = os.path.abspath(run_dir)
        self.directory = os.path.join(self.run_dir, "checkpoints")
        self.keep = keep
        self.async_save = async_save
        self._open()

    def _open(self):
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, enable_async_checkpointing=self.async_save, create=True
            ),
        )

    def save(self, step: int, state, *, meta: dict, data_iter, reference=None) -> None:
        items = dict(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            data_iter=DataIterSave(data_iter),
        )
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose metadata reads; corrupt ones set aside."""
        while True:
            step = self.manager.latest_step()
            if step is None:
                return None
            try:
                meta = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
                return step, meta["meta"]
            except Exception as e:  # noqa: BLE001 - any failure means unusable
                self._set_aside(step, e)

    def restore(self, step: int, abstract_state, *, data_iter, abstract_reference=None):
        """Restores into the given abstract (sharded ShapeDtypeStruct) trees; the iterator in place.

        Returns (state, reference or None), or raises after setting a corrupt step aside.
        """
        items: dict[str, Any] = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iter is not None:
            items["data_iter"] = DataIterRestore(data_iter)
        if abstract_reference is not None:
            items["reference"] = ocp.args.StandardRestore(abstract_reference)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            self._set_aside(step, e)
            raise CorruptCheckpoint(step) from e
        return out["state"], out.get("reference") if abstract_reference is not None else None

    def _set_aside(self, step: int, error: Exception) -> None:
        source = os.path.join(self.directory, str(step))
        target_dir = os.path.join(self.run_dir, "corrupt")
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, f"{step}")
        n = 0
        while os.path.exists(target):
            n += 1
            target = os.path.join(target_dir, f"{step}.{n}")
        log.warning(
            "checkpoint step %d in %s cannot be restored (%s: %s); moved to %s, using the previous "
            "one",
            step,
            self.directory,
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
            target,
        )
        self.manager.close()
        # One process moves it; every process reaches this point for the same step (they restore
        # the same files), and waits until the move is done before listing again.
        if jax.process_index() == 0:
            shutil.move(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"rsa_jax set aside checkpoint {step}")
        self._open()


class CorruptCheckpoint(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"checkpoint {step} could not be restored and was set aside")
        self.step = step


def abstract_like(tree):
    """ShapeDtypeStructs carrying each array's sharding (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
