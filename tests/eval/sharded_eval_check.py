"""Run in a subprocess with 8 simulated CPU devices (the device count is fixed per process):
sampling and teacher-forced scoring with the parameters sharded as in training (meshes 8x1x1,
2x2x2, 1x4x2, a scanned model, a Hugging Face directory loaded onto a mesh) equal the
single-device results: the same tokens for the same seed, log-probabilities to 1e-5. Prints one
JSON line of per-case results."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import rsa_jax.eval._evaluate as driver  # noqa: E402 (to count its generate calls: batches)
from rsa_jax.config import MeshConfig, ModelConfig  # noqa: E402
from rsa_jax.eval import (  # noqa: E402
    evaluate_model,
    load_model,
    placement_of,
    response_logprob,
    sampling_bytes_per_row,
)
from rsa_jax.models import save_hf, tiny_config  # noqa: E402
from rsa_jax.tasks import TEMPLATE, OracleScorer, SafetyTask, make_tokenizer  # noqa: E402
from rsa_jax.training import Layout, define_model, init_params, make_mesh  # noqa: E402

TASK = SafetyTask()
TOK = make_tokenizer(TASK)
PROMPTS = ["ask topic0 style1 n2", "ask topic3 style5 n0", "ask topic7 style0 n9"]
N, NEW = 5, 6  # 15 rows: not a multiple of 8, so the last batch is filled up
# 88 = the task's 86 tokens rounded up to a multiple of 8, so the tensor axis splits the vocab.
LLAMA = tiny_config(vocab_size=88, max_position_embeddings=64)
MODEL = ModelConfig(compute_dtype="float32", remat=False)


def build(mesh_config, devices, *, seed=0, scan=False):
    mesh = make_mesh(mesh_config, devices)
    config = dataclasses.replace(MODEL, init_seed=seed, scan_layers=scan)
    spec = define_model(config, LLAMA, Layout(mesh, mesh_config.rules))
    return spec.module(init_params(spec, config))


def cache_shapes(model, rows: int, prompt_len: int) -> list[str]:
    """The per-device shapes of the float32 KV cache [L, R, S, K, E] in the compiled sampler (a
    test-only look at the private jitted function: the cache must stay split, never gathered)."""
    import jax.numpy as jnp
    from flax import nnx

    from rsa_jax.generate import place_rows
    from rsa_jax.generate._sampling import _generate

    shardings = placement_of(model).generate_shardings(rows, prompt_len + NEW, LLAMA)
    graphdef, state = nnx.split(model)
    ids = place_rows(np.ones((rows, prompt_len), np.int32), shardings.rows)
    mask = place_rows(np.ones((rows, prompt_len), bool), shardings.rows)
    row_ids = place_rows(np.arange(rows, dtype=np.int32), shardings.rows)
    scalars = (jnp.float32(1), jnp.int32(0), jnp.float32(1), jnp.asarray([2]), jnp.int32(0))
    lowered = _generate.lower(
        graphdef, state, ids, mask, jax.random.key(0), row_ids, *scalars,
        max_new_tokens=NEW, shardings=shardings,
    )  # fmt: skip
    text = lowered.compile().as_text()
    layers, slots, e = LLAMA.num_hidden_layers, prompt_len + NEW, LLAMA.head_dim
    return sorted(set(re.findall(rf"f32\[{layers},\d+,{slots},\d+,{e}\]", text)))


def sharded_params(model) -> int:
    """How many parameters are split over at least two devices."""
    from flax import nnx

    count = 0
    for _, value in nnx.to_flat_state(nnx.state(model)):
        sharding = value[...].sharding
        if isinstance(sharding, NamedSharding) and any(
            sharding.spec[i] is not None for i in range(len(sharding.spec))
        ):
            count += 1
    return count


BATCHES = []  # rows of each generate call since the last run()


def _counting_generate(model, prompt_ids, *args, _real=driver.generate, **kwargs):
    BATCHES.append(len(prompt_ids))
    return _real(model, prompt_ids, *args, **kwargs)


driver.generate = _counting_generate


def run(model, reference, **kwargs):
    """(samples, log model(y|x) [R], logratio [R]) of one evaluation."""
    BATCHES.clear()
    scores, samples = evaluate_model(
        model,
        TOK,
        PROMPTS,
        OracleScorer(TASK),
        reference=reference,
        n=N,
        max_new_tokens=NEW,
        seed=7,
        template=TEMPLATE,
        **kwargs,
    )
    batches = list(BATCHES)
    return samples, response_logprob(model, samples, **kwargs), scores.logratio, batches


def compare(base, got):
    (s0, lp0, kl0, _), (s1, lp1, kl1, batches) = base, got
    return dict(
        batches=batches,
        same_tokens=bool(np.array_equal(s0.tokens, s1.tokens)),
        same_lengths=bool(np.array_equal(s0.lengths, s1.lengths)),
        same_texts=s0.texts == s1.texts,
        logprob_diff=float(np.max(np.abs(lp0 - lp1))),
        logratio_diff=float(np.max(np.abs(kl0 - kl1))),
        logprob_scale=float(np.max(np.abs(lp0))),
    )


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    single = MeshConfig(data=1)
    one = devices[:1]
    out = {}
    policy, reference = build(single, one), build(single, one, seed=1)
    assert placement_of(policy) is None  # one device: the unsharded path
    base = run(policy, reference)
    # A budget of one row: 15 batches of one row on one device.
    per_row = sampling_bytes_per_row(LLAMA, base[0].prompt_ids.shape[1], NEW)
    out["single_budget"] = compare(base, run(policy, reference, memory_budget=per_row))
    out["distinct_rows"] = int(len({tuple(r) for r in base[0].tokens}))
    for name, mesh in (
        ("8x1x1", MeshConfig(data=8)),
        ("2x2x2", MeshConfig(data=2, fsdp=2, tensor=2)),
        ("1x4x2", MeshConfig(data=1, fsdp=4, tensor=2)),
    ):
        policy, reference = build(mesh, devices), build(mesh, devices, seed=1)
        placement = placement_of(policy)
        case = compare(base, run(policy, reference))
        case["sharded_params"] = sharded_params(policy)
        case["row_shards"] = placement.row_shards
        case["cache_shapes"] = cache_shapes(policy, 16, base[0].prompt_ids.shape[1])
        out[name] = case
    # A budget of one row per device: 15 rows in two batches of 8 on the 2x2x2 mesh.
    mesh = MeshConfig(data=2, fsdp=2, tensor=2)
    policy, reference = build(mesh, devices), build(mesh, devices, seed=1)
    out["2x2x2_budget"] = compare(base, run(policy, reference, memory_budget=per_row))
    # Scanned layers (another init of the same seed: compared with a scanned single device).
    scan_base = run(build(single, one, scan=True), build(single, one, seed=1, scan=True))
    out["2x2x2_scan"] = compare(
        scan_base, run(build(mesh, devices, scan=True), build(mesh, devices, seed=1, scan=True))
    )
    # A Hugging Face directory loaded straight onto a mesh by load_model.
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(build(single, one), os.path.join(tmp, "policy"), TOK)
        save_hf(build(single, one, seed=1), os.path.join(tmp, "reference"), TOK)
        policy, tok = load_model(os.path.join(tmp, "policy"), mesh)
        reference, _ = load_model(os.path.join(tmp, "reference"), mesh)
        assert len(tok) == len(TOK)
        case = compare(base, run(policy, reference))
        case["sharded_params"] = sharded_params(policy)
        out["hf_2x2x2"] = case
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
