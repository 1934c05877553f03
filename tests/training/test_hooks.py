"""The trainer's per-step work as hooks on `Engine.fit`: when each runs, in which order, and the
non-finite guard before every checkpoint (no checkpoint ever holds NaN weights)."""

import os
import types

import jax.numpy as jnp
import optax
import pytest

from rsa_jax.config import load_config
from rsa_jax.data import write_toy_data
from rsa_jax.training import Checkpoints, Hooks, NonFiniteError, StepInfo, train
from rsa_jax.training._hooks import all_finite

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _info(step: int, total: int = 7, metrics=None) -> StepInfo:
    stage = types.SimpleNamespace(total=total)
    return StepInfo(stage, metrics or {}, 0.1, 0.0, step)


def test_hooks_run_in_order_at_their_steps_and_any_can_stop():
    seen = []
    hooks = Hooks()
    hooks.add(lambda info: seen.append(("every", info.step)))
    hooks.add(lambda info: seen.append(("3", info.step)), every=3)
    hooks.add(lambda info: seen.append(("3+end", info.step)), every=3, at_end=True)
    hooks.add(lambda info: seen.append(("end", info.step)), every=0, at_end=True)
    hooks.add(lambda info: info.step == 6)  # asks to stop at step 6
    stops = [hooks.run(_info(step)) for step in range(1, 8)]
    assert stops == [False] * 5 + [True, False]
    assert [s for s in seen if s[0] == "every"] == [("every", i) for i in range(1, 8)]
    assert [s[1] for s in seen if s[0] == "3"] == [3, 6]
    assert [s[1] for s in seen if s[0] == "3+end"] == [3, 6, 7]
    assert [s[1] for s in seen if s[0] == "end"] == [7]
    # within a step, registration order
    assert seen[seen.index(("every", 3)) + 1] == ("3", 3)


def test_a_variant_view_slices_stacked_metrics_and_keeps_shared_scalars():
    info = _info(2, metrics={"loss": jnp.array([0.5, 0.25]), "tokens": jnp.array(12.0)})
    assert info.variant(1).values() == {"loss": 0.25, "tokens": 12.0}
    assert info.variant(0).values() == {"loss": 0.5, "tokens": 12.0}


def test_all_finite_looks_at_every_float_leaf():
    tree = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2)), "step": jnp.array(3, jnp.int32)}}
    assert all_finite(tree)
    assert not all_finite({**tree, "d": jnp.array([1.0, jnp.nan])})
    assert not all_finite({**tree, "d": jnp.array([jnp.inf], jnp.bfloat16)})


def test_weights_made_nan_by_a_finite_step_are_never_checkpointed(tmp_path):
    """A step whose loss and gradient norm are finite but whose update is NaN (a NaN learning
    rate) leaves NaN weights: the guard before the save stops the run, nothing is written."""
    data = str(tmp_path / "pairs.jsonl")
    write_toy_data(data, rows=16)
    run_dir = str(tmp_path / "run")
    config = load_config(
        TINY,
        [
            f"data.path={data}",
            f"train.run_dir={run_dir}",
            "stages.0.steps=2",
            "stages.1.steps=1",
            "checkpoint.every=1",
        ],
    )
    with pytest.raises(NonFiniteError, match="NaN or infinite values; stopped before saving"):
        train(config, tx=optax.scale(float("nan")))
    ckpt = Checkpoints(run_dir, async_save=False, read_only=True)
    try:
        assert ckpt.latest_meta() is None  # no checkpoint, so none with NaN weights
    finally:
        ckpt.close()
