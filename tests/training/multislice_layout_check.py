"""Run in a subprocess with 8 simulated CPU devices: the meshes that `mesh.slices` lays out. Prints
one JSON line: per case, the device ids of the mesh as a nested list (data, fsdp, tensor)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json  # noqa: E402

import jax  # noqa: E402

from rsa_jax.config import ConfigError, MeshConfig  # noqa: E402
from rsa_jax.training import make_mesh  # noqa: E402


def ids(mesh):
    return [[[d.id for d in row] for row in plane] for plane in mesh.devices]


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    out = {
        "one_slice": ids(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)),
        "two_slices": ids(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, slices=2), devices)),
        "two_slices_fill": ids(make_mesh(MeshConfig(data=-1, fsdp=2, slices=2), devices)),
        "four_slices": ids(make_mesh(MeshConfig(data=4, fsdp=2, slices=4), devices)),
        "axis_names": list(make_mesh(MeshConfig(data=-1, slices=2), devices).axis_names),
    }
    try:
        make_mesh(MeshConfig(data=1, fsdp=8, slices=2), devices)
        out["fsdp_across_slices"] = "built"
    except ConfigError as e:
        out["fsdp_across_slices"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
