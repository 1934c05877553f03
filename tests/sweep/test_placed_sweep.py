"""A vmap sweep with its K axis on the `variant` mesh axis (`variant_devices` in the sweep file)
trains the same variants to the same losses and parameters as the one-device vmap sweep, with
each variant's state split over the variant axis and the frozen LoRA base held unstacked; bad
settings fail naming `variant_devices`.

The mesh runs use 8 simulated CPU devices in a subprocess (`placed_sweep_check.py`; the device
count is fixed per process). Tolerances are the vmap test's (1e-5 on every logged loss and
every final parameter). Both stages use ERM (not CVaR) and Adam's eps is 1e-6: the placed
program splits the batch over `data` (and the full model over fsdp/tensor), so it sums in
other orders than the one-device program; a CVaR tail picked by a threshold on the token
log-ratios turns those rounding differences into other tail members after the first update
(measured with stage 1 on cvar_reference, K=4 x data=2, lr 3e-3: losses 1e-4 and adapters
6e-3 apart by the last step), and Adam at eps = 1e-8 magnifies near-zero gradients' rounding
(see tests/training/test_sharded.py). With these settings the measured differences were: LoRA
K=4 x data=2, losses 6e-8 and adapters 3.4e-7 apart; full fine-tuning K=2 x fsdp=2 x tensor=2,
losses 1.2e-7 and parameters 4.4e-6 apart. One slow test runs stage 1 on cvar_reference (the
selection vmapped under the variant axis) and compares the losses only, to 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
import yaml

from rsa_jax.config import load_config
from rsa_jax.sweep import SweepError, describe, load_sweep, variant_placement

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _run_check(*args: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "placed_sweep_check.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_placement(out: dict, mesh: dict) -> None:
    """The spied stages: two one-device stages, then two placed on `mesh`, every stacked array
    split over `variant` and the shared ones not stacked."""
    k = out["k"]
    one, placed = out["stages"][:2], out["stages"][2:]
    assert len(placed) == 2
    assert all(s["mesh"] == {"variant": 1, "data": 1, "fsdp": 1, "tensor": 1} for s in one)
    for i, stage in enumerate(placed):
        assert stage["mesh"] == mesh
        stacked = stage["params"] + stage["opt_state"] + stage["step"] + stage["hyper"]
        for spec, shape in stacked:
            assert spec.startswith("P('variant'") and shape[0] == k, (spec, shape)
        # Parameters: K copies of the model definition's shapes.
        assert [shape[1:] for _, shape in stage["params"]] == stage["param_shapes"]
        assert stage["opt_state"] and stage["hyper"]
        if stage["base"] is not None:  # LoRA: one base, the model's shapes, not over `variant`
            assert [shape for _, shape in stage["base"]] == stage["base_shapes"]
            assert not any("variant" in spec for spec, _ in stage["base"])
            reference = stage["reference"]  # the reference adapters: off, then stacked copies
            assert reference == ([] if i == 0 else stage["params"])
        elif i == 0:  # full fine-tuning, stage 1: the initial model, shared, not stacked
            assert [shape for _, shape in stage["reference"]] == stage["param_shapes"]
            assert not any("variant" in spec for spec, _ in stage["reference"])
        else:  # stage 2: each variant's own stage-1 policy, stacked like the policy
            assert stage["reference"] == stage["params"]


def _check_equal(out: dict) -> None:
    assert out["one_compiles"] == [1, 1] and out["placed_compiles"] == [1, 1], out
    assert out["loss_diff"] <= 1e-5, out["per_variant_loss_diff"]
    assert out["param_diff"] <= 1e-5, out["per_variant_loss_diff"]
    # The variants really differ (their own hyperparameters), so the comparison is not vacuous.
    assert out["variant_spread"] > 1e-4, out


@pytest.mark.slow  # 8 simulated devices, two LoRA sweeps compiled twice (about 2 minutes)
def test_adapter_sweep_on_variant_mesh_equals_one_device():
    """LoRA (nf4 base), K=4 variants over variant=4 x data=2."""
    out = _run_check("lora")
    _check_equal(out)
    _check_placement(out, {"variant": 4, "data": 2, "fsdp": 1, "tensor": 1})


@pytest.mark.slow  # the same run and one more compile of each placed step
def test_adapter_sweep_collectives_stay_inside_variant_groups():
    """With the batch over data inside each group, XLA's partitioned step moves nothing between
    variant groups: every collective's devices lie in one group (the gradient sums over data).
    (Not asserted for fsdp/tensor inside a group, where jax 0.10.2's partitioner does move
    activations between groups: see rsa_jax/sweep/_placement.py.)"""
    out = _run_check("lora", "--collectives")
    _check_equal(out)
    for stage in out["stages"][2:]:
        total, cross = stage["collectives"]
        assert total > 0 and cross == [], stage["collectives"]


@pytest.mark.slow  # the LoRA run again, with a cvar_reference stage
def test_cvar_reference_stage_on_variant_mesh():
    """Stage 1 on cvar_reference: the selection behind its threshold runs vmapped over the
    variants (its batching rule joins their rows in one loop, `losses._select`), inside the
    partitioned step. It compiles once per stage, moves nothing between variant groups, and keeps
    the one-device losses to the CVaR tolerance of the module docstring (measured 5.4e-5; the
    parameters drift further there, as documented, so they are not compared)."""
    out = _run_check("lora", "--collectives", "--cvar")
    assert out["one_compiles"] == [1, 1] and out["placed_compiles"] == [1, 1], out
    assert out["loss_diff"] <= 1e-4, out["per_variant_loss_diff"]
    assert out["variant_spread"] > 1e-4, out
    _check_placement(out, {"variant": 4, "data": 2, "fsdp": 1, "tensor": 1})
    for stage in out["stages"][2:]:
        total, cross = stage["collectives"]
        assert total > 0 and cross == [], stage["collectives"]


@pytest.mark.slow  # another four compiles of the full tiny model (about a minute)
def test_full_finetuning_sweep_on_variant_mesh_equals_one_device():
    """Full fine-tuning, K=2 variants over variant=2 x fsdp=2 x tensor=2: the stacked
    parameters are also split over the model axes, as in training."""
    out = _run_check("full")
    _check_equal(out)
    _check_placement(out, {"variant": 2, "data": 1, "fsdp": 2, "tensor": 2})
    specs = [spec for spec, _ in out["stages"][2]["params"]]
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs


# ---------------------------------------------------------------- settings (no training)


def _sweep_file(tmp_path, **doc) -> str:
    doc = {"base": TINY, "run_dir": str(tmp_path / "runs"), "mode": "vmap", **doc}
    path = str(tmp_path / "sweep.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def test_variant_devices_is_read_and_described(tmp_path):
    path = _sweep_file(tmp_path, grid={"stages.1.beta": [0.1, 0.05]}, variant_devices=2)
    sweep = load_sweep(path)
    assert sweep.variant_devices == 2
    assert "variants over a variant mesh axis of 2 devices" in describe(sweep)
    assert load_sweep(_sweep_file(tmp_path, grid={"stages.1.beta": [0.1]})).variant_devices is None


@pytest.mark.parametrize(
    "value,words",
    [
        (0, ["variant_devices must be a positive number", "0"]),
        ("two", ["variant_devices must be a positive number", "'two'"]),
        (True, ["variant_devices must be a positive number", "True"]),
        (3, ["variant_devices: 3 does not divide the 2 variants"]),
    ],
)
def test_bad_variant_devices_in_the_file_name_the_field(tmp_path, value, words):
    path = _sweep_file(tmp_path, grid={"stages.1.beta": [0.1, 0.05]}, variant_devices=value)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    message = str(e.value)
    assert message.startswith(path), message
    for w in words:
        assert w in message, (w, message)


@pytest.mark.parametrize(
    "devices,k,overrides,words",
    [
        (3, 4, [], ["variant_devices: 2 does not divide the 3 devices"]),
        (4, 3, [], ["variant_devices: 2 does not divide the 3 variant(s)"]),
        (4, 4, ["mesh.data=4"], ["2 device(s) per variant group", "mesh", "2 devices"]),
        (16, 4, [], ["8 device(s) per variant group", "data.batch_size", "batch shards"]),
    ],
)
def test_placement_that_does_not_divide_names_the_field(devices, k, overrides, words):
    """Checked before any mesh is built: the device list only gives its length here (this
    process has one CPU device), as `jax.devices()` would on a machine with that many."""
    config = load_config(TINY, overrides)
    with pytest.raises(SweepError) as e:
        variant_placement(config, k, 2, where="s.yaml", devices=[jax.devices()[0]] * devices)
    message = str(e.value)
    assert message.startswith("s.yaml: variant_devices"), message
    for w in words:
        assert w in message, (w, message)
