"""Orbax checkpoints of a run: policy + optimizer state, reference (when it is a trained stage),
the data iterator's position, PRNG key, stage index and the resolved config.

Orbax writes each step into a temporary directory and renames it when complete, so a partial
checkpoint is never listed. A listed checkpoint that fails to restore (corrupt files) is moved
aside to `corrupt/` (never overwritten or deleted) and the previous one is used, with a warning.
"""

from __future__ import annotations

import logging
import os
import shutil

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
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
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
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
        shutil.move(source, target)
        self._open()


class CorruptCheckpoint(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"checkpoint {step} could not be restored and was set aside")
        self.step = step


def abstract_like(tree):
    """ShapeDtypeStructs carrying each array's sharding (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
