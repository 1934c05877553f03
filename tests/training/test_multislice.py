"""Multislice meshes (`mesh.slices`): the data axis spans the slices, fsdp and tensor stay inside.

The layout checks are cheap (simulated CPU devices and stand-in device objects); the compile for
two TPU v5p-8 slices (libtpu's compiler, no TPU needed) is slow and needs libtpu."""

import dataclasses
import importlib.util
import os

import pytest

from rsa_jax.config import ConfigError, load_config, validate
from rsa_jax.training._mesh import slice_groups

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int


def test_devices_group_by_slice_index_in_their_order():
    devices = [FakeDevice(i, s) for i, s in enumerate([1, 0, 1, 0, 0, 1])]
    groups = slice_groups(devices, 2)
    assert [[d.id for d in g] for g in groups] == [[1, 3, 4], [0, 2, 5]]


def test_slice_count_must_match_the_devices():
    devices = [FakeDevice(i, i // 2) for i in range(4)]
    with pytest.raises(ConfigError, match=r"says 1 slice.*set mesh.slices=2"):
        slice_groups(devices, 1)
    uneven = [FakeDevice(i, s) for i, s in enumerate([0, 0, 0, 1])]
    with pytest.raises(ConfigError, match="different device counts"):
        slice_groups(uneven, 2)
    with pytest.raises(ConfigError, match="3 slices do not divide the 4 devices"):
        slice_groups(list(range(4)), 3)  # no slice_index: consecutive runs


def test_config_checks_name_mesh_slices():
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    with pytest.raises(ConfigError, match="mesh.slices"):
        load_config(tiny, ["mesh.slices=0"])
    config = load_config(
        tiny, ["mesh.data=-1", "mesh.fsdp=4", "mesh.slices=2", "data.batch_size=8"]
    )
    with pytest.raises(ConfigError, match=r"mesh.slices: the data axis \(1 .*2 slices"):
        validate(config, device_count=4)
    validate(config, device_count=8)


def test_cpu_mesh_layout_on_eight_devices(device_script):
    out = device_script(os.path.join(HERE, "multislice_layout_check.py"))
    # Devices without slice_index: consecutive runs are the slices, data slice-major.
    assert out["two_slices"] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert out["two_slices_fill"] == [[[0], [1]], [[2], [3]], [[4], [5]], [[6], [7]]]
    assert out["four_slices"] == out["two_slices_fill"]
    assert out["axis_names"] == ["data", "fsdp", "tensor"]  # the same three axes
    assert "mesh.slices" in out["fsdp_across_slices"]  # fsdp=8 would cross the slices: refused


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (tpu-compile)")
def test_only_gradient_reductions_cross_slices_in_the_tpu_compile(device_script):
    """Two v5p-8 slices, data=2 across them, fsdp=4 inside: the DCN carries the data axis's
    reductions (gradients in bf16/f32, plus the loss and norm scalars); parameters are gathered
    inside a slice only. What else crosses (measured, see docs/scale.md): the per-pair float
    scalars of the chosen/rejected split (point-to-point), well under a percent of the gradient
    bytes. The radix select, whose rows span the slices, sends nothing: per-row histograms and
    no shortcut branch voted on across devices (`_select._kth_pair_keys`)."""
    out = device_script(os.path.join(HERE, "multislice_tpu_check.py"), devices=1, timeout=900)
    assert out["slices"] == [0, 1] and out["slice_of"] == [0] * 4 + [1] * 4
    assert out["inside"]["all-gather"] > 0  # fsdp's parameter gathers, inside a slice
    crossing = out["crossing"]
    reduce = crossing["ALL_REDUCE"]
    floats = sum(n for t, n in reduce["elements"].items() if t in ("bf16", "f32"))
    assert floats >= out["param_elements"] // out["fsdp"]  # at least one gradient shard
    other = {k: v for k, v in crossing.items() if k != "ALL_REDUCE"}
    assert set(other) <= {"ONE_TO_ONE"}, other  # no gather, all-to-all or reduce-scatter
    other_bytes = sum(v["bytes"] for v in other.values())
    assert other_bytes <= 0.01 * reduce["bytes"], (other_bytes, reduce["bytes"])


def test_vmap_sweeps_refuse_a_multislice_mesh():
    from rsa_jax.sweep import SweepError, variant_placement

    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["mesh.slices=2"])
    with pytest.raises(SweepError, match="sweep.yaml: mesh.slices: vmap sweeps run on one slice"):
        variant_placement(config, 8, None, where="sweep.yaml")
