"""Run by test_lora.py in its own process with 8 simulated CPU devices: the LoRA forward and the
adapter gradients on a (data=2, fsdp=2, tensor=2) mesh equal one device's, for a float32 base
(unrolled layers) and an nf4 base (scanned layers). Prints one JSON line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from rsa_jax.config import MeshConfig
from rsa_jax.models import Llama, LoraConfig, split_lora, tiny_config, to_lora
from rsa_jax.training import logical_spec, make_mesh
from rsa_jax.training._mesh import batch_sharding

MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]] * 2, bool)
POSITIONS = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)
IDS = np.random.default_rng(0).integers(0, 256, size=MASK.shape)


def case(storage: str, scan: bool, mesh, rules) -> dict:
    model = Llama(tiny_config(), rngs=nnx.Rngs(0), scan_layers=scan)
    lora = LoraConfig(rank=4, alpha=8.0, base_storage=storage, block_size=16)
    spec, base, adapters = split_lora(to_lora(model, lora, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(3)
    adapters = {
        k: jnp.asarray(0.05 * rng.normal(size=v.shape), v.dtype) if k.endswith("_b") else v
        for k, v in adapters.items()
    }
    weights = jnp.asarray(rng.normal(size=(*IDS.shape, 256)), jnp.float32)

    def loss(adapters, base, ids, positions, mask):
        m = spec.module(base, adapters)
        logits = m.logits(m(ids, positions, mask))
        return (logits * weights).sum() / 100, logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    batch = (jnp.asarray(IDS), jnp.asarray(POSITIONS), jnp.asarray(MASK))
    (_, logits1), grads1 = step(adapters, base, *batch)

    def to_sharding(axes, shape):
        return NamedSharding(mesh, logical_spec(axes, shape, mesh, rules))

    base_s = jax.device_put(base, spec.shardings(base, to_sharding))
    adapters_s = jax.device_put(adapters, spec.shardings(adapters, to_sharding))
    rows = batch_sharding(mesh, rules)
    batch_s = tuple(jax.device_put(x, rows) for x in batch)
    (_, logits8), grads8 = step(adapters_s, base_s, *batch_s)

    def n_split(tree):
        return sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(tree))

    return {
        "logits_diff": float(np.abs(np.asarray(logits8) - np.asarray(logits1)).max()),
        "grad_diff": max(
            float(np.abs(np.asarray(grads8[k]) - np.asarray(grads1[k])).max()) for k in grads1
        ),
        "sharded_adapters": n_split(adapters_s),
        "sharded_base": n_split(base_s),
        "grad_sharded": n_split(grads8),
    }


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    config = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(config)
    rules = config.rules
    out = {
        "float32": case("float32", False, mesh, rules),
        "nf4_scan": case("nf4", True, mesh, rules),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
