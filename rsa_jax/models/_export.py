"""Writing an exported Hugging Face directory: dtype, sharding, permissions, portable metadata.

- Weights in float32 or bfloat16; above `max_shard_size` bytes they are split into
  `model-00001-of-0000N.safetensors` files with the `model.safetensors.index.json` that transformers
  and `load_hf` read (the split is huggingface_hub's `split_state_dict_into_shards_factory`).
- Files are readable by others: safetensors writes through a private temporary file (mode 0600),
  so every written file gets the mode a plain `open` would give (0666 minus the umask).
- `tokenizer_config.json` drops the settings that describe this machine or this load
  (`local_files_only`, `is_local`, cache paths, absolute paths), so the directory is portable.
- `generation_config.json` holds the BOS/EOS/pad ids that `generate` uses.
"""

from __future__ import annotations

import glob
import json
import os
import re

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# HF's default shard limit (transformers' save_pretrained uses the same).
DEFAULT_MAX_SHARD_SIZE = "5GB"
INDEX = "model.safetensors.index.json"
# Keys of tokenizer_config.json that describe how and where it was loaded, not the tokenizer.
_LOAD_TIME_KEYS = (
    "local_files_only",
    "is_local",
    "cache_dir",
    "name_or_path",
    "_name_or_path",
    "_commit_hash",
    "token",
    "use_auth_token",
    "revision",
    "force_download",
    "proxies",
    "trust_remote_code",
)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of a size like 5GB, 500MB, 2GiB or 1000000 (decimal units, as transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value, unit = size, ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"not a size: {size!r} (e.g. 5GB, 500MB, 2GiB or a byte count)")
        value, unit = float(match.group(1)), match.group(2).upper()
    result = int(value * _UNITS[unit])
    if result < 1:
        raise ValueError(f"a shard size must be at least 1 byte, got {size!r}")
    return result


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(path: str) -> None:
    """Gives `path` the permissions of a plainly created file (readable by others)."""
    os.chmod(path, _file_mode())


def check_finite(tensors: dict[str, np.ndarray], what: str) -> None:
    """ValueError counting the tensors of `tensors` that hold NaN or infinity (the first named):
    weights like that are useless to whoever loads them, so nothing is written."""
    bad = [name for name, t in tensors.items() if not np.isfinite(t).all()]
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN or infinite values "
            f"(first: {sorted(bad)[0]}); nothing was written. The run diverged: lower "
            "optim.learning_rate or export an earlier checkpoint"
        )


def cast(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return {k: np.ascontiguousarray(v.astype(DTYPES[dtype])) for k, v in tensors.items()}


def write_weights(
    tensors: dict[str, np.ndarray], path: str, max_shard_size: int | str | None = None
) -> list[str]:
    """Writes `model.safetensors`, or shards + index above `max_shard_size`; returns the files.

    Weight files of an earlier export in `path` are removed first, so a stale single file or
    shard can never shadow the new weights.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    check_finite(tensors, path)

    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE),
    )
    for old in glob.glob(os.path.join(path, "model*.safetensors")) + [os.path.join(path, INDEX)]:
        if os.path.isfile(old):
            os.remove(old)
    written = []
    for filename, names in split.filename_to_tensors.items():
        file = os.path.join(path, filename)
        save_file({n: tensors[n] for n in names}, file, metadata={"format": "pt"})
        written.append(file)
    if split.is_sharded:
        index = {
            "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        file = os.path.join(path, INDEX)
        with open(file, "w") as f:
            json.dump(index, f, indent=2)
        written.append(file)
    return written


def _local_path(value: str) -> bool:
    return "\n" not in value and os.path.isabs(value) and os.path.exists(value)


def portable_tokenizer_config(path: str) -> None:
    """Rewrites `path/tokenizer_config.json` without load-time and machine-local settings."""
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return
    with open(file) as f:
        values = json.load(f)
    kept = {
        k: v
        for k, v in values.items()
        # an absolute path that exists here is this machine's (a cache or source directory)
        if k not in _LOAD_TIME_KEYS and not (isinstance(v, str) and _local_path(v))
    }
    with open(file, "w") as f:
        json.dump(kept, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_generation_config(
    path: str, bos: int | None, eos: int | list[int] | None, pad: int | None
) -> str:
    """`generation_config.json` through transformers' GenerationConfig (its own format)."""
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(path)
    return os.path.join(path, "generation_config.json")
