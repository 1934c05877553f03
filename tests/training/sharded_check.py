"""Run in a subprocess with 8 simulated CPU devices (the device count is fixed per process):
the train step on meshes 8x1x1, 2x2x2, 1x4x2 equals the single-device step, 4 microbatches
equal one batch, and the step compiles once. Prints one JSON line of max differences."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rsa_jax.config import (  # noqa: E402
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    StageConfig,
    TrainConfig,
)
from rsa_jax.models import tiny_config  # noqa: E402
from rsa_jax.training import BATCH_KEYS, Engine, Layout, init_params, make_mesh, state_shardings
from rsa_jax.training._mesh import place_batch

B, P, R, V = 8, 8, 8, 256
MODEL = ModelConfig(compute_dtype="float32", remat=False)
STAGE = StageConfig(loss="ra_dpo", risk="cvar_reference", mu=0.9)
# Adam's eps = 1e-6 (not the default 1e-8) conditions the parameter comparison; see the module
# docstring of test_sharded.py for the measurement.
OPTIM = OptimConfig(learning_rate=1e-3, warmup_ratio=0.0, weight_decay=0.01, eps=1e-6)
STEPS = 2


def make_batch(seed):
    rng = np.random.default_rng(seed)
    rows, length = 2 * B, P + R
    ids = rng.integers(4, V, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), bool)
    pad = rng.integers(0, 4, rows)  # left padding of the prompt, right padding of the response
    for r in range(rows):
        mask[r, : pad[r]] = False
        mask[r, length - pad[(r + 3) % rows] :] = False
    ids[~mask] = 0
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], 1)
    loss_mask = np.zeros_like(mask)
    loss_mask[:, P - 1 : -1] = mask[:, P:]
    return dict(
        input_ids=ids, positions=positions, attention_mask=mask, labels=labels, loss_mask=loss_mask
    )


def run(mesh_config, devices, microbatches):
    layout = Layout(make_mesh(mesh_config, devices), MeshConfig().rules)
    config = Config(
        model=MODEL,
        data=DataConfig(batch_size=B),
        optim=dataclasses.replace(OPTIM, microbatches=microbatches),
        mesh=mesh_config,
        train=TrainConfig(chunk_size=8),
        stages=[STAGE],
    )
    engine = Engine(config, layout=layout, llama=tiny_config())
    # A reference away from the policy: at policy == reference every d_t(v) is 0 up to rounding
    # and the CVaR mask 1[d > tau] picks among ties, which no two programs need to agree on.
    reference = init_params(engine.model, dataclasses.replace(MODEL, init_seed=1))
    state = engine.new_state(engine.initial)
    step = engine.compiled_step(engine.objective(STAGE), state_shardings(state))
    hyper = engine.hyper(STAGE, 10)
    losses = []
    for i in range(STEPS):
        batch = make_batch(i)
        batch = place_batch({k: v for k, v in batch.items() if k in BATCH_KEYS}, layout.batch)
        state, metrics = step(state, reference, batch, hyper)
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    sharded = {k: str(v.sharding.spec) for k, v in state.params.items()}
    return losses, jax.device_get(state.params), step._cache_size(), sharded


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    base_losses, base_params, compiles, _ = run(MeshConfig(data=1), devices[:1], 1)
    out = {"single_compiles": compiles, "losses": base_losses}
    cases = {
        "8x1x1": (MeshConfig(data=8, fsdp=1, tensor=1), 1),
        "2x2x2": (MeshConfig(data=2, fsdp=2, tensor=2), 1),
        "1x4x2": (MeshConfig(data=1, fsdp=4, tensor=2), 1),
        "micro4": (MeshConfig(data=1), 4),
    }
    for name, (mesh_config, micro) in cases.items():
        devs = devices[:1] if name == "micro4" else devices
        losses, params, compiles, specs = run(mesh_config, devs, micro)
        out[name] = {
            "loss_diff": max(abs(a[0] - b[0]) for a, b in zip(losses, base_losses, strict=True)),
            "grad_norm_rel_diff": max(
                abs(a[1] - b[1]) / b[1] for a, b in zip(losses, base_losses, strict=True)
            ),
            "param_diff": max(
                float(np.max(np.abs(params[k] - base_params[k]))) for k in base_params
            ),
            "compiles": compiles,
            "sharded_params": sum(1 for s in specs.values() if s != "PartitionSpec()"),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
