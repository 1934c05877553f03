"""What a sweep variant's run directory holds (finished or not), and the sweep's printed lines:
shared by both sweep modes (`_run.py` sequential, `_vmap.py` vmap), which do not import each
other."""

from __future__ import annotations

import json

from rsa_jax.config import to_json
from rsa_jax.sweep._file import SweepError, Variant


def say(message: str) -> None:
    print(message, flush=True)


def has_checkpoints(run_dir: str) -> bool:
    from rsa_jax.training import RunDir

    return RunDir(run_dir).has_checkpoints()


def is_done(variant: Variant) -> bool:
    """True when the variant's run directory has a readable final checkpoint of its last stage
    marked done. Raises SweepError when that run was made with another config."""
    if not has_checkpoints(variant.run_dir):
        return False
    from rsa_jax.training import CheckpointMeta, Checkpoints, absolute_paths, config_diff

    ckpt = Checkpoints(variant.run_dir, async_save=False, read_only=True)
    try:
        found = ckpt.latest_meta()
    finally:
        ckpt.close()
    if found is None:
        return False
    meta = CheckpointMeta.from_dict(found[1], f"{ckpt.directory}/{found[0]}")
    done = meta.final(len(variant.config.stages))
    own = json.loads(to_json(absolute_paths(variant.config)))
    if done and (differ := config_diff(meta.config, own)):
        raise SweepError(
            f"variant {variant.name!r}: {variant.run_dir} holds a finished run made with another "
            f"config (differing: {', '.join(differ)}); remove it or give the sweep another run_dir"
        )
    return done
