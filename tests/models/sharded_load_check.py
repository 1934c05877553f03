"""Run by test_sharded_load.py in its own process: 8 simulated CPU devices (fixed at jax start).

Loads a tiny Gemma 3 style model unsharded and sharded on a (fsdp=4, tensor=2) mesh, unrolled
and scanned, and checks placements, parameter equality and the forward. Exits non-zero on any
mismatch.
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402

from rsa_jax.models import Llama, load_hf, save_hf, tiny_config  # noqa: E402

RULES = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
         "vocab": "tensor"}  # fmt: skip
ACTIVATION_RULES = {"batch": "fsdp"}  # activations: data-parallel over fsdp


def main(path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 2)  # fmt: skip

    def spec(axes, rules=RULES):
        return PartitionSpec(*(rules.get(a) for a in axes))

    def shardings(param_path, axes):
        return NamedSharding(mesh, spec(axes))

    def constrain(x, axes):
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, spec(axes, ACTIVATION_RULES))
        )

    # Gemma 3 (q/k norms over head_dim, four norms, a sliding and a global layer) with Qwen2's
    # q/k/v biases and an untied head: every kind of parameter the rules must place.
    config = tiny_config(model_type="gemma3_text", attention_bias=True, tie_word_embeddings=False)
    save_hf(Llama(config, rngs=nnx.Rngs(7)), path)
    mask = np.array([[0, 1, 1, 1, 1, 1, 0, 0]] * 4, bool)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ids = np.random.default_rng(0).integers(0, 256, size=mask.shape)

    def forward(model):
        return model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))

    for scan in (False, True):
        plain = load_hf(path, scan_layers=scan)
        sharded = load_hf(path, scan_layers=scan, shardings=shardings, constrain=constrain)
        n_split = 0
        for (pa, a), (pb, b) in zip(
            nnx.to_flat_state(nnx.state(plain, nnx.Param)),
            nnx.to_flat_state(nnx.state(sharded, nnx.Param)),
            strict=True,
        ):
            assert pa == pb
            want = NamedSharding(mesh, spec(b.get_metadata()["logical_axes"]))
            assert b[...].sharding.is_equivalent_to(want, b.ndim), (pb, b[...].sharding)
            n_split += len(b[...].sharding.device_set) == 8 and b[...].sharding.spec != ()
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
        assert n_split > 0
        want = np.asarray(nnx.jit(forward)(plain))
        got = nnx.jit(forward)(sharded)
        np.testing.assert_allclose(np.asarray(got)[mask], want[mask], rtol=1e-5, atol=1e-5)
        print(f"scan_layers={scan}: {n_split} sharded parameters, forward equal")


if __name__ == "__main__":
    main(sys.argv[1])
