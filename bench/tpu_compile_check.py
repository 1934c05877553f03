"""An independent TPU compile of the 7B Ra-DPO step, to check `rsa-jax compile`'s numbers.

Built by hand, without `rsa_jax.compile`: the v5p-8 topology from
`jax.experimental.topologies`, a (data=1, fsdp=4, tensor=1) mesh over its devices, Llama-2-7B's
shapes typed in from its config.json, the engine's train step (`Engine.compiled_step`, the
program `rsa-jax train` runs) lowered on `ShapeDtypeStruct`s with the run's shardings, and
XLA:TPU's `memory_analysis()` printed raw. No weight is read or allocated. Compare with

    rsa-jax compile configs/ra_dpo.yaml --topology v5p-8 model.path=llama-2-7b \\
        model.scan_layers=true data.batch_size=16 optim.microbatches=1 mesh.data=1 mesh.fsdp=4

    python bench/tpu_compile_check.py              # a few minutes (needs libtpu)
    python bench/tpu_compile_check.py --layers 2   # the same program with 2 blocks (quicker)
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh

from rsa_jax.config import load_config
from rsa_jax.models import LlamaConfig
from rsa_jax.training import BATCH_KEYS, Engine, Hyper, Layout, TrainState, opt_state_shardings

GIB = 1024**3
ROOT = os.path.join(os.path.dirname(__file__), "..")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    config = load_config(
        os.path.join(ROOT, "configs", "ra_dpo.yaml"),
        [
            "model.scan_layers=true",
            "data.batch_size=16",
            "optim.microbatches=1",
            "mesh.data=1",
            "mesh.fsdp=4",
            "train.compilation_cache_dir=",  # compile, never load
        ],
    )
    llama = LlamaConfig(  # meta-llama/Llama-2-7b-hf config.json
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    )
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name="v5:2x2x1",
        chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    grid = np.asarray(topology.devices).reshape(1, 4, 1)
    mesh = Mesh(grid, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    engine = Engine(config, layout=Layout(mesh, config.mesh.rules), llama=llama, tokenizer=object())
    rep = engine.layout.replicated

    def sds(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    params = engine.model.abstract_params()
    opt = jax.eval_shape(engine.tx.init, params)
    opt = jax.tree.map(sds, opt, opt_state_shardings(engine.tx, params, rep))
    state = TrainState(params, opt, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    reference = params  # the initial model, sharded as the policy
    rows = 2 * config.data.batch_size
    length = config.data.max_prompt_len + config.data.max_response_len
    dtypes = {"attention_mask": jnp.bool_, "loss_mask": jnp.bool_}
    batch = {
        k: jax.ShapeDtypeStruct(
            (rows, length), dtypes.get(k, jnp.int32), sharding=engine.layout.batch
        )
        for k in BATCH_KEYS
    }
    stage = config.stages[0]
    hyper = jax.eval_shape(lambda: Hyper.for_stage(stage, config.optim, 1000))
    hyper = jax.tree.map(lambda x: sds(x, rep), hyper)
    step = engine.compiled_step(engine.objective(stage), jax.tree.map(lambda x: x.sharding, state))
    t0 = time.perf_counter()
    compiled = step.lower(state, reference, batch, hyper).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    print(m)
    arguments, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
    outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    total = arguments + outputs + temp + m.generated_code_size_in_bytes
    print(
        f"Llama-2 shapes, {args.layers} layers, Ra-DPO + cvar_reference, 16 pairs x {length}, "
        f"v5p-8 fsdp=4: arguments {arguments / GIB:.2f} GiB + temporaries {temp / GIB:.2f} GiB "
        f"+ outputs {outputs / GIB:.2f} GiB + code {m.generated_code_size_in_bytes / GIB:.3f} "
        f"GiB = {total / GIB:.2f} GiB per chip; lowered and compiled in {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
