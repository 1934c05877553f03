"""Run in a subprocess (libtpu loaded, no TPU present): the tiny model's Ra-DPO + cvar_reference
train step compiled by the TPU compiler for two v5p-8 slices (mesh data=2 across the slices,
fsdp=4 inside each), and the compiled HLO's communication split into collectives inside a slice
(by kind) and transfers across slices over the DCN (by kind, with element counts per dtype).
Prints one JSON line. `RSA_JAX_HLO_OUT=path` also writes the compiled HLO text there;
`--select sort` compiles the head with `losses.kth_smallest_pair_sort` in place of the radix
select (what docs/scale.md compares)."""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles may hold libtpu's lock
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's environment probing

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from rsa_jax.config import (  # noqa: E402
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    StageConfig,
    TrainConfig,
)
from rsa_jax.models import tiny_config  # noqa: E402
from rsa_jax.training import (  # noqa: E402
    BATCH_KEYS,
    Engine,
    Hyper,
    Layout,
    make_mesh,
    opt_state_shardings,
)

B, L = 8, 32
MESH = MeshConfig(data=2, fsdp=4, tensor=1, slices=2)
STAGE = StageConfig(loss="ra_dpo", risk="cvar_reference", mu=0.9)
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def groups_of(line: str) -> list[list[int]]:
    """The device groups of one collective: explicit `{{0,1},{2,3}}`, the iota form
    `[G,S]<=[dims]T(perm)`, or a collective-permute's source-target pairs."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        g, s = int(m.group(1)), int(m.group(2))
        dims = [int(x) for x in m.group(3).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(x) for x in m.group(4).split(",")])
        return ids.reshape(g, s).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:  # named axes of a reshaped device list: `mesh['a'=4,'b'=2] {'a'}` groups over a
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        chosen = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        rest = [i for i in range(len(names)) if i not in chosen]
        ids = np.arange(int(np.prod(sizes))).reshape(sizes).transpose(rest + chosen)
        return ids.reshape(-1, int(np.prod([sizes[i] for i in chosen]))).tolist()
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{}]*\})\}", line)
    if m:
        return [
            [int(x) for x in grp.split(",") if x] for grp in re.findall(r"\{([\d,]*)\}", m.group(1))
        ]
    return []


def main():
    if sys.argv[1:] == ["--select", "sort"]:
        from rsa_jax import losses
        from rsa_jax.losses import _risk

        _risk.kth_smallest_pair = losses.kth_smallest_pair_sort
    topo = topologies.get_topology_desc(
        platform="tpu",
        topology_name="v5p:2x2x1",
        chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=2,
    )
    devices = list(topo.devices)
    mesh = make_mesh(MESH, devices)
    slice_of = [d.slice_index for d in mesh.devices.flat]  # HLO device ids index this order
    layout = Layout(mesh, MESH.rules)
    config = Config(
        model=ModelConfig(compute_dtype="bfloat16", remat=True),
        data=DataConfig(batch_size=B),
        mesh=MESH,
        train=TrainConfig(chunk_size=16),
        stages=[STAGE],
    )
    engine = Engine(config, layout=layout, llama=tiny_config())
    rep = layout.replicated
    params = engine.model.abstract_params()
    opt = jax.eval_shape(engine.tx.init, params)
    opt_sh = opt_state_shardings(engine.tx, params, rep)
    opt = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), opt, opt_sh
    )
    step_abs = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
    from rsa_jax.training import TrainState

    state = TrainState(params, opt, step_abs)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch = {
        k: jax.ShapeDtypeStruct(
            (2 * B, L), np.bool_ if k.endswith("mask") else np.int32, sharding=layout.batch
        )
        for k in BATCH_KEYS
    }
    hyper = Hyper.for_stage(STAGE, config.optim, 10, None)
    hyper = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=rep), hyper
    )
    step = engine.compiled_step(engine.objective(STAGE), state_sh)
    compiled = step.lower(state, params, batch, hyper).compile()
    hlo = compiled.as_text()
    if os.environ.get("RSA_JAX_HLO_OUT"):
        with open(os.environ["RSA_JAX_HLO_OUT"], "w") as f:
            f.write(hlo)
    # The compiled program is one slice's: its collectives' groups name that slice's devices, and
    # what crosses slices became host transfers over the DCN (send/recv pairs tagged with
    # `_xla_megascale_transfer_type`), counted here once, by their send.
    inside = {k: 0 for k in KINDS}
    crossing: dict[str, dict] = {}
    for line in hlo.splitlines():
        transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
        if transfer and re.match(r"\s*%send[.\d]* = ", line):
            kind = transfer.group(1)
            shape = re.search(r"= \((\w+)\[([\d,]*)\]", line)
            assert shape, line
            dtype, dims = shape.group(1), shape.group(2)
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            entry = crossing.setdefault(kind, {"count": 0, "elements": {}, "bytes": 0})
            entry["count"] += 1
            entry["elements"][dtype] = entry["elements"].get(dtype, 0) + n
            entry["bytes"] += n * DTYPE_BYTES.get(dtype, 4)
            continue
        m = re.search(r"\s(" + "|".join(KINDS) + r")(?:-start)?\(", line)
        if not m or "=" not in line:
            continue
        groups = groups_of(line)
        assert groups or "source_target_pairs={}" in line, line  # {}: a permute of nothing
        assert all(i < len(devices) // 2 for g in groups for i in g), line  # one slice's ids
        inside[m.group(1)] += 1
    out = {
        "inside": inside,
        "crossing": crossing,
        "param_elements": sum(int(np.prod(p.shape)) for p in params.values()),
        "fsdp": MESH.fsdp,
        "slices": sorted({d.slice_index for d in devices}),
        "slice_of": slice_of,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
