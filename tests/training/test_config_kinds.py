"""Each config key's kind (traced, program, resume-ignored, cosmetic, label) is declared once,
next to its field in `rsa_jax.config`; the traced step arguments, the keys a resume ignores and
the keys vmap variants may differ in all derive from that declaration."""

import dataclasses
import typing

import numpy as np

from rsa_jax.config import (
    COSMETIC,
    KINDS,
    LABEL,
    PROGRAM,
    RESUME_IGNORED,
    TRACED,
    Config,
    OptimConfig,
    StageConfig,
    key_kind,
    traced_fields,
)
from rsa_jax.losses import TRACED_NAMES
from rsa_jax.sweep._vmap import _may_differ
from rsa_jax.training import TRACED_OPTIM_FIELDS, Hyper, config_diff
from rsa_jax.training._optim import OptimHyper
from rsa_jax.training._rundir import RESUME_IGNORED as IGNORED_ON_RESUME


def _declared(node, prefix=""):
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        if "kind" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["kind"]
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        for arg in args:
            if dataclasses.is_dataclass(arg):
                yield from _declared(arg, f"{prefix}{f.name}.")


def test_every_declared_kind_is_one_of_the_five():
    declared = dict(_declared(Config))
    assert declared and set(declared.values()) <= set(KINDS), declared


def test_the_traced_stage_fields_are_the_loss_kernel_arguments():
    assert traced_fields(StageConfig) == TRACED_NAMES
    assert TRACED_OPTIM_FIELDS == traced_fields(OptimConfig)
    stage = StageConfig(beta=0.3, alpha=0.7, mu=0.8, gamma=0.9)
    hyper = Hyper.for_stage(stage, OptimConfig(learning_rate=0.25), total_steps=10)
    for name in TRACED_NAMES:
        assert np.isclose(getattr(hyper.loss, name), getattr(stage, name)), name
    assert isinstance(hyper.optim, OptimHyper) and np.isclose(hyper.optim.learning_rate, 0.25)


def test_kinds_of_keys_and_what_derives_from_them():
    assert key_kind("stages.3.beta") == TRACED and key_kind("optim.learning_rate") == TRACED
    assert key_kind("stages.0.name") == LABEL
    assert key_kind("stages.0.risk") == PROGRAM and key_kind("optim.b1") == PROGRAM
    assert key_kind("mesh.rules.batch.0") == RESUME_IGNORED  # under a declared field
    assert key_kind("checkpoint.keep") == COSMETIC and key_kind("data.path") == RESUME_IGNORED
    # The resume check ignores exactly the RESUME_IGNORED and COSMETIC keys.
    assert "train.log_every" in IGNORED_ON_RESUME and "stages.*.data_path" in IGNORED_ON_RESUME
    saved = {"train": {"log_every": 1, "seed": 0}, "stages": [{"beta": 0.1, "data_path": "a"}]}
    new = {"train": {"log_every": 5, "seed": 0}, "stages": [{"beta": 0.2, "data_path": "b"}]}
    assert config_diff(saved, new) == ["stages.0.beta"]
    # vmap variants may differ in traced, cosmetic and label keys, nothing else.
    for key in ("stages.1.beta", "train.seed", "checkpoint.every", "stages.1.name"):
        assert _may_differ(key), key
    for key in ("stages.1.risk", "mesh.data", "model.path", "optim.microbatches", "data.seed"):
        assert not _may_differ(key), key
