"""Checks of a local Hugging Face model directory, before transformers or the loaders see it.

Without them a missing directory reaches transformers' `from_pretrained(path,
local_files_only=True)` as a hub repo id ("Repo id must be in the form ..."), and a directory
without tokenizer files fails deep inside transformers. Models are never downloaded.
"""

from __future__ import annotations

import os

# Any one of these sets is enough for transformers to build a tokenizer.
TOKENIZER_FILES = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)


def check_model_dir(path: str, key: str = "model.path") -> None:
    """FileNotFoundError unless `path` is an existing directory; the message names `key`."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{key} {path!r} does not exist (expected a local Hugging Face model directory, or "
            "'tiny'; models are never downloaded)"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key} {path!r} is a file, not a model directory")


def check_tokenizer_dir(path: str, key: str = "model.path") -> None:
    """FileNotFoundError unless `path` is a directory holding tokenizer files."""
    check_model_dir(path, key)
    for files in TOKENIZER_FILES:
        if all(os.path.isfile(os.path.join(path, f)) for f in files):
            return
    wanted = ", ".join(" + ".join(files) for files in TOKENIZER_FILES)
    raise FileNotFoundError(f"{key} {path!r} has no tokenizer files (one of: {wanted})")
