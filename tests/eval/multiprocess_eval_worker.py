"""One process of the multi-process evaluation in test_sharded_eval.py (run as a script).

    python multiprocess_eval_worker.py DEVICES OUT_PREFIX

With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set it joins the run
(`maybe_initialize_distributed`), builds the tiny policy and reference sharded on a 2x2x2 mesh
over all processes' devices, evaluates them in batches of one row per device and writes what it
got back (every process gets every row) to OUT_PREFIX_<process>.npz.
"""

from __future__ import annotations

import sys

import jax


def main(devices: int, prefix: str) -> None:
    jax.config.update("jax_num_cpu_devices", devices)
    from rsa_jax.training._mesh import maybe_initialize_distributed

    maybe_initialize_distributed()  # before anything touches the backend
    import numpy as np

    from rsa_jax.config import MeshConfig, ModelConfig
    from rsa_jax.eval import evaluate_model, response_logprob, sampling_bytes_per_row
    from rsa_jax.models import tiny_config
    from rsa_jax.tasks import TEMPLATE, OracleScorer, SafetyTask, make_tokenizer
    from rsa_jax.training import Layout, define_model, init_params, make_mesh

    task = SafetyTask()
    tok = make_tokenizer(task)
    llama = tiny_config(vocab_size=88, max_position_embeddings=64)
    mesh_config = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mesh_config)

    def build(seed):
        config = ModelConfig(compute_dtype="float32", remat=False, init_seed=seed)
        spec = define_model(config, llama, Layout(mesh, mesh_config.rules))
        return spec.module(init_params(spec, config))

    policy, reference = build(0), build(1)
    prompts = ["ask topic0 style1 n2", "ask topic3 style5 n0", "ask topic7 style0 n9"]
    scores, samples = evaluate_model(
        policy,
        tok,
        prompts,
        OracleScorer(task),
        reference=reference,
        n=5,
        max_new_tokens=6,
        seed=7,
        template=TEMPLATE,
        memory_budget=sampling_bytes_per_row(llama, samples_width(tok, prompts), 6),
    )
    logp = response_logprob(policy, samples)
    np.savez(
        f"{prefix}_{jax.process_index()}.npz",
        tokens=samples.tokens,
        lengths=samples.lengths,
        logp=logp,
        logratio=scores.logratio,
    )
    print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)


def samples_width(tok, prompts) -> int:
    """The prompt slots P of the encoded prompts (the budget is one row's bytes at this P)."""
    from rsa_jax.eval import encode_prompts
    from rsa_jax.tasks import TEMPLATE

    return encode_prompts(tok, prompts, TEMPLATE)[0].shape[1]


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
