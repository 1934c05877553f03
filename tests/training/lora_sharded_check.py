"""Run in a subprocess with 8 simulated CPU devices: the LoRA (nf4 base) train step on meshes
8x1x1, 2x2x2, 1x4x2 equals the single-device step; the base and the adapters are partitioned
by their logical axes. Prints one JSON line of max differences.

`python lora_sharded_check.py [DROPOUT]`: with a rate > 0 the step draws adapter-dropout masks,
which must not depend on the mesh either (JAX's partitionable threefry draws the same bits for
an array whatever its sharding)."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sharded_check import OPTIM, STAGE, B, make_batch  # noqa: E402

from rsa_jax.config import (  # noqa: E402
    Config,
    DataConfig,
    LoraSettings,
    MeshConfig,
    ModelConfig,
    TrainConfig,
)
from rsa_jax.models import tiny_config  # noqa: E402
from rsa_jax.training import BATCH_KEYS, Engine, Layout, make_mesh, state_shardings
from rsa_jax.training._mesh import place_batch

DROPOUT = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
LORA = LoraSettings(rank=4, alpha=8.0, base_storage="nf4", block_size=16, dropout=DROPOUT)
MODEL = ModelConfig(compute_dtype="float32", remat=False, lora=LORA)
STEPS = 2


def _perturbed(adapters, seed):
    """B away from 0 (the gradient of A is 0 at B = 0), drawn on the host: same on every mesh."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in adapters.items():
        host = np.asarray(v)
        if k.endswith("_lora_b"):
            host = host + 0.05 * rng.standard_normal(host.shape).astype(np.float32)
        out[k] = jax.device_put(host, v.sharding)
    return out


def run(mesh_config, devices):
    layout = Layout(make_mesh(mesh_config, devices), MeshConfig().rules)
    config = Config(
        model=MODEL,
        data=DataConfig(batch_size=B),
        optim=OPTIM,
        mesh=mesh_config,
        train=TrainConfig(chunk_size=8),
        stages=[STAGE],
    )
    engine = Engine(config, layout=layout, llama=tiny_config())
    policy = _perturbed(engine.initial, 0)
    # A reference away from the policy (stage-2 style: adapters of its own on the same base), so
    # the CVaR mask does not pick among rounding ties.
    frozen = engine.frozen(_perturbed(engine.initial, 1))
    state = engine.new_state(policy)
    step = engine.compiled_step(
        engine.objective(STAGE), state_shardings(state), reference_adapters=True
    )
    hyper = engine.hyper(STAGE, 10)
    assert (hyper.dropout_key is not None) == (DROPOUT > 0)
    losses = []
    for i in range(STEPS):
        batch = make_batch(i)
        batch = place_batch({k: v for k, v in batch.items() if k in BATCH_KEYS}, layout.batch)
        state, metrics = step(state, frozen, batch, hyper)
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(state.params)]
    base_specs = [str(x.sharding.spec) for x in jax.tree.leaves(engine.base)]
    return losses, jax.device_get(state.params), step._cache_size(), specs, base_specs


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    base_losses, base_params, compiles, _, _ = run(MeshConfig(data=1), devices[:1])
    out = {"single_compiles": compiles, "losses": base_losses}
    cases = {
        "8x1x1": MeshConfig(data=8, fsdp=1, tensor=1),
        "2x2x2": MeshConfig(data=2, fsdp=2, tensor=2),
        "1x4x2": MeshConfig(data=1, fsdp=4, tensor=2),
    }
    for name, mesh_config in cases.items():
        losses, params, compiles, specs, base_specs = run(mesh_config, devices)
        pairs = list(zip(losses, base_losses, strict=True))
        out[name] = {
            "loss_diff": max(abs(a[0] - b[0]) for a, b in pairs),
            "grad_norm_rel_diff": max(abs(a[1] - b[1]) / b[1] for a, b in pairs),
            "param_diff": max(
                float(np.max(np.abs(params[k] - base_params[k]))) for k in base_params
            ),
            "compiles": compiles,
            "sharded_adapters": sum(1 for s in specs if s != "PartitionSpec()"),
            "sharded_base": sum(1 for s in base_specs if s != "PartitionSpec()"),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
