"""`rsa-jax compile`: the tiny run compiled for a v5e-4 by libtpu (one compile), the exit codes
and one-line errors, and the analytic FLOP count against an unrolled CPU compile."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from rsa_jax.cli import main
from rsa_jax.compile import (
    TPU_SLICES,
    SamplerShape,
    collectives,
    compile_config,
    libtpu_available,
    parameter_count,
    report,
    sampler_flops,
    step_flops,
    train_programs,
)
from rsa_jax.compile._programs import materialised_bytes
from rsa_jax.config import load_config
from rsa_jax.eval import placement_for, sample, sampling_call, sampling_rows
from rsa_jax.generate import _sampling
from rsa_jax.models import Llama, LlamaConfig, tiny_config
from rsa_jax.tasks import TEMPLATE, SafetyTask, make_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
# Both stages against the initial model: the two-stage run is one program, so one compile.
# dpo/kl: the cheapest kernel to compile (no selection loops).
ONE_PROGRAM = [
    "stages.1.reference=init",
    "stages.0.loss=dpo",
    "stages.0.risk=kl",
    "stages.1.loss=dpo",
    "stages.1.risk=kl",
]
# FSDP with microbatches: data=2 x fsdp=2, two microbatches of 4 pairs (rows over all 4 chips).
FSDP = ["mesh.data=2", "mesh.fsdp=2", "optim.microbatches=2", "data.batch_size=8"]
needs_libtpu = pytest.mark.skipif(
    not libtpu_available(), reason="libtpu not installed (pip install 'rsa_jax[tpu-compile]')"
)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_compiled():
    """The CLI's run on the tiny two-stage config for a v5e-4 (the module's one compile; the
    sampler, eight times the train step's compile, has its own slow test)."""
    # Arrays earlier tests left in reference cycles are freed by the collector, not by the
    # compile: collect them first so only what the compile allocates is counted.
    gc.collect()
    before = materialised_bytes()
    argv = ["compile", TINY, "--topology", "v5e-4", "--no-sampler", "--collectives-detail", "3"]
    argv += [*ONE_PROGRAM, *FSDP]
    code, out, err = _run(argv)
    gc.collect()
    return code, out, err, materialised_bytes() - before


@needs_libtpu
def test_tiny_two_stage_step_compiles_fits_and_reports(tiny_compiled):
    code, out, err, allocated = tiny_compiled
    assert code == 0, err
    lines = out.splitlines()
    name = "train step of stages 0 (helpfulness), 1 (safety)"
    assert f"compiling {name} for v5e-4 ..." in lines
    compiled = [line for line in lines if line.startswith(f"compiled {name} in ")]
    assert len(compiled) == 1 and compiled[0].endswith(" s")
    assert lines.index(f"compiling {name} for v5e-4 ...") < lines.index(compiled[0])
    assert any("fits:" in line and "of 16 GiB per chip" in line for line in lines)
    for role in ("parameters", "optimizer state", "reference", "temporaries"):
        assert any(line.strip().startswith(role) and "GiB" in line for line in lines), role
    assert any("FLOPs per step (analytic)" in line and "step time >=" in line for line in lines)
    # FSDP: weights gathered over fsdp, gradients reduce-scattered over fsdp, summed over data
    for kind, axis in [("all-gather", "fsdp"), ("reduce-scatter", "fsdp"), ("all-reduce", "data")]:
        assert any(line.split()[:3] == [kind, "over", axis] for line in lines), (kind, out)
    # --collectives-detail 3: the three largest ops, each with its bytes and the JAX op it is
    detail = lines.index("  the 3 largest collectives per step (per chip):")
    ops = lines[detail + 1 : detail + 4]
    assert all("/step = " in op and " over " in op and "jit(" in op for op in ops), ops
    # nothing was placed on a device: the compile used shapes only
    assert allocated == 0


@needs_libtpu
def test_tiny_memory_roles_are_the_shards_and_exit_1_names_what_does_not_fit(tiny_compiled):
    config = load_config(TINY, ONE_PROGRAM + FSDP)
    # the fixture's train step, cached (the sampler has its own test)
    (r,) = compile_config(config, "v5e-4", sampler=False, say=lambda _: None)
    assert r.memory is not None and r.fits
    params = parameter_count(_tiny_llama()) * 4 // 2  # float32, sharded over fsdp=2
    assert r.memory.roles["parameters"] == params
    assert r.memory.roles["reference"] == params
    assert params * 2 <= r.memory.roles["optimizer state"] < params * 2 + 1024  # moments + counts
    assert r.memory.temporaries > 0 and r.needed_bytes >= sum(r.memory.roles.values())
    # FSDP's activations stay sharded by rows: nothing [rows, tokens, features]-sized is
    # all-reduced over fsdp (left to propagation, XLA contracted over the sharded feature axis
    # and all-reduced every layer's activations: 3.3 MiB per step here, 8x the parameters)
    assert r.collectives is not None
    all_reduced = r.collectives.bytes.get(("all-reduce", "fsdp"), 0)
    assert all_reduced < 2 * params, r.collectives.bytes  # 2 x the shard: the whole model
    # the same program on a chip too small for it: exit 1 and one line saying by how much
    chip = dataclasses.replace(r.tpu.chip, hbm_bytes=r.needed_bytes // 2)
    small = dataclasses.replace(r, tpu=dataclasses.replace(r.tpu, chip=chip))
    said: list[str] = []
    assert report([small], said.append) == 1
    errors = [line for line in said if line.startswith("error: ")]
    over = (r.needed_bytes - r.needed_bytes // 2) / 1024**3
    assert errors == [
        f"error: does not fit: {r.name} needs {r.needed_bytes / 1024**3:.2f} GiB per chip, "
        f"{over:.2f} GiB over the 0 GiB of a v5e chip"
    ]


def _tiny_llama() -> LlamaConfig:
    from rsa_jax.data import train_bpe_tokenizer
    from rsa_jax.models import tiny_config

    return tiny_config(vocab_size=len(train_bpe_tokenizer()))


@needs_libtpu
def test_compiles_never_use_the_persistent_compilation_cache(monkeypatch):
    """An executable compiled for topology devices cannot be loaded back without a TPU (jax
    0.10.2), so `compile_config` builds every program with the cache off, whatever the config
    says (before, each compile wrote entries that no later run could read)."""
    from rsa_jax.compile import _run

    seen = []

    def stop(config, *args, **kwargs):
        seen.append(config.train.compilation_cache_dir)
        raise StopIteration

    monkeypatch.setattr(_run, "train_programs", stop)
    config = load_config(TINY, ["train.compilation_cache_dir=/tmp/anywhere"])
    with pytest.raises(StopIteration):
        compile_config(config, "v5e-4", sampler=False, say=lambda _: None)
    assert seen == [""]


def test_both_out_of_hbm_messages_are_read_as_the_bytes_needed():
    from rsa_jax.compile._run import _out_of_memory

    gib = 1024**3
    used = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory: Used 102.31G of 95.74G hbm.")
    assert _out_of_memory(used) == int(102.31 * gib)
    # the temporaries alone (llama3_70b_qlora's sampler raised this one, uncaught before)
    temps = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (105.07G) exceeds available HBM (95.74G)."
    )
    assert _out_of_memory(temps) == int(105.07 * gib)
    assert _out_of_memory(RuntimeError("INVALID_ARGUMENT: something else")) is None


def test_bad_topology_name_is_one_line_listing_the_known_ones():
    code, out, err = _run(["compile", TINY, "--topology", "v5x-9"])
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "'v5x-9' is not a known TPU slice" in line
    assert all(name in line for name in ("v4-8", "v5e-16", "v5p-8", "v5p-64", "v6e-8"))


@needs_libtpu
def test_mesh_that_does_not_divide_the_chips_is_one_line():
    code, out, err = _run(["compile", TINY, "--topology", "v5e-4", "mesh.data=1", "mesh.tensor=3"])
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "mesh" in line and "v5e-4: 4 chips" in line


def test_unknown_model_path_is_one_line_naming_the_presets():
    code, _, err = _run(["compile", TINY, "--topology", "v5p-8", "model.path=llama-9-1b"])
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "'llama-9-1b'" in line and "llama-2-7b" in line and "qwen2.5-7b" in line


@needs_libtpu
def test_model_that_cannot_fit_is_one_line_without_compiling():
    # Llama-3-70B full fine-tuning on 4 v5e chips: 280 GB of float32 weights alone per chip
    argv = ["compile", TINY, "--topology", "v5e-4", "model.path=llama-3-70b"]
    code, out, err = _run([*argv, "model.scan_layers=true", "stages.1.reference=init"])
    assert code == 1, err
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    # one line per program: the train step, and the sampler (its merged float32 weights alone)
    assert [e.split(" needs ")[0] for e in errors] == [
        "error: does not fit: train step of stages 0 (helpfulness), 1 (safety)",
        "error: does not fit: eval sampler (4 rows x 128 prompt + 64 new tokens)",
    ]
    assert all("GiB over the 16 GiB" in e for e in errors)
    assert "    (not compiled: the policy's float32 parameters alone exceed the" in out.splitlines()
    assert not any(line.startswith("compiling ") for line in out.splitlines())


def test_slice_table_counts_chips_as_cloud_tpu_names_do():
    assert TPU_SLICES["v5p-8"].chips == 4 and TPU_SLICES["v5p-8"].topology == "v5:2x2x1"
    assert TPU_SLICES["v4-16"].chips == 8
    assert TPU_SLICES["v5e-16"].chips == 16 and TPU_SLICES["v6e-8"].topology == "v6e:2x4"


# -- the analytic FLOP count against a compile whose cost analysis sees every matmul ----------
_FLOP_MODEL = LlamaConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
)
_FLOP_BASE = [
    "model.compute_dtype=float32",
    "model.attention=xla",
    "model.scan_layers=false",  # unrolled blocks: cost_analysis counts each once, correctly
    "data.max_prompt_len=32",
    "data.max_response_len=32",
    "data.batch_size=2",
    "stages.0.loss=dpo",
    "stages.0.risk=kl",
    "train.chunk_size=64",  # one chunk: the fused head's scan runs once
    "optim.microbatches=1",
]


@pytest.mark.parametrize(
    "overrides, tolerance",
    [
        # full fine-tuning: the uncounted elementwise work is under 3% of this small model's
        (["model.remat=true", "train.head=fused"], 0.03),
        pytest.param(["model.remat=false", "train.head=logits"], 0.03, marks=pytest.mark.slow),
        # LoRA: XLA's dead-code elimination of frozen-weight paths is modelled to 3%
        pytest.param(
            ["model.remat=true", "train.head=logits", "model.lora.rank=8"],
            0.03,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_analytic_flops_match_an_unrolled_compile(overrides, tolerance):
    config = load_config(None, [*_FLOP_BASE, *overrides])
    (program,) = train_programs(config, jax.devices()[:1], _FLOP_MODEL)
    compiled = program.lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = step_flops(program.llama, program.shape)
    # The loops left are the loss head's row blocks (elementwise, no matmul): every dot is
    # outside a loop, so cost_analysis counts each matmul exactly once per step.
    assert abs(analytic / cost["flops"] - 1) < tolerance, (analytic, cost["flops"])


_ALL_REDUCE = (
    "  %all-reduce.1 = f32[8]{0} all-reduce(%v), channel_id=1, "
    "replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, use_global_device_ids=true, "
    'to_apply=%add, metadata={op_name="jit(f)/while/body/psum"}'
)
_ALL_GATHER = (
    "  %all-gather.2 = bf16[16]{0} all-gather(%b), channel_id=2, "
    "replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}"
)
_HLO = f"""HloModule m

%add (x: f32[], y: f32[]) -> f32[] {{
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {{
  %p = (s32[], f32[8]) parameter(0)
  %v = f32[8]{{0}} get-tuple-element(%p), index=1
{_ALL_REDUCE}
  ROOT %t = (s32[], f32[8]) tuple(%i, %all-reduce.1)
}}

%cond (p: (s32[], f32[8])) -> pred[] {{
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %constant.1 = s32[] constant(5)
  ROOT %compare = pred[] compare(%i, %constant.1), direction=LT
}}

ENTRY %main (a: f32[8], /*index=1*/b: bf16[4]) -> f32[8] {{
  %a = f32[8]{{0}} parameter(0)
  %while.1 = (s32[], f32[8]) while(%tuple), condition=%cond, body=%body
{_ALL_GATHER}
  ROOT %r = f32[8]{{0}} get-tuple-element(%while.1), index=1
}}
"""


def test_collectives_are_counted_by_mesh_axis_and_loop_trip_count():
    found = collectives(_HLO, {"data": 2, "fsdp": 2})
    # inside a 5-trip loop, over the second mesh axis: 8 floats x 5
    assert found.ops[("all-reduce", "fsdp")] == 1
    assert found.bytes[("all-reduce", "fsdp")] == 8 * 4 * 5
    # iota groups transposed: devices {0, 2} and {1, 3} vary along the first axis
    assert found.bytes[("all-gather", "data")] == 16 * 2
    assert found.unknown_loops == 0
    # per op, largest per step first: where it sits, how often it runs, what JAX called it
    reduce, gather = found.largest
    assert (reduce.kind, reduce.axes, reduce.calls, reduce.bytes_per_call) == (
        "all-reduce",
        "fsdp",
        5,
        32,
    )
    assert reduce.computation == "body" and reduce.op_name == "jit(f)/while/body/psum"
    assert reduce.bytes_per_step == 160 and "160 B/step = 32 B x 5" in reduce.line()
    assert (gather.kind, gather.calls, gather.op_name) == ("all-gather", 1, "")


# XLA:TPU's forms: replica groups over the axes of a mesh whose device ids are a transposed
# iota, and a reduce-scatter as a fusion calling an `all-reduce-scatter` computation.
_MESH_GROUPS = "replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0))"
_REDUCE = f"all-reduce(%input), channel_id=1, {_MESH_GROUPS} {{'axis_1'}}, to_apply=%add"
_GATHER = f"all-gather(%a), channel_id=2, {_MESH_GROUPS} {{'axis_0'}}, dimensions={{0}}"
_TPU_HLO = f"""HloModule m

%all-reduce-scatter.1 (input: f32[64,8]) -> f32[32,8] {{
  %input = f32[64,8]{{1,0}} parameter(0)
  %all-reduce.2 = f32[64,8]{{1,0}} {_REDUCE}
  ROOT %slice = f32[32,8]{{1,0}} dynamic-slice(%all-reduce.2, %z, %z), dynamic_slice_sizes={{32,8}}
}}

ENTRY %main (a: f32[64,8]) -> f32[32,8] {{
  %a = f32[64,8]{{1,0}} parameter(0)
  %gather = f32[128,8]{{1,0}} {_GATHER}
  ROOT %fusion = f32[32,8]{{1,0}} fusion(%a), kind=kCustom, calls=%all-reduce-scatter.1
}}
"""


def test_tpu_replica_group_and_reduce_scatter_forms_are_read():
    found = collectives(_TPU_HLO, {"data": 2, "fsdp": 2})
    # device ids [[0, 2], [1, 3]]: mesh axis 1 pairs devices {0, 2} and {1, 3}: the data axis
    assert found.bytes == {
        ("reduce-scatter", "data"): 64 * 8 * 4,
        ("all-gather", "fsdp"): 128 * 8 * 4,
    }


@needs_libtpu
@pytest.mark.slow
def test_qlora_and_the_vmap_sweep_compile_for_a_slice():
    qlora = ["model.lora.rank=4", "model.lora.base_storage=nf4", "model.lora.block_size=16"]
    code, out, err = _run(["compile", TINY, "--topology", "v5e-4", *qlora])
    assert code == 0, err
    assert "frozen base + reference" in out
    sweep = ["--sweep", "2", "--variant-devices", "2"]
    code, out, err = _run(["compile", TINY, "--topology", "v5e-4", *sweep, *ONE_PROGRAM])
    assert code == 0, err
    assert "compiled vmap sweep step (K=2) of stages 0 (helpfulness), 1 (safety) in " in out


@needs_libtpu
def test_collective_axes_are_read_right_from_tpu_hlo():
    """Two reductions of an (a=2, b=2)-sharded array on a v5e-4, one per mesh axis: XLA:TPU's
    replica groups must map back to the axis each one reduces over."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from rsa_jax.compile import topology_devices

    mesh = Mesh(np.asarray(topology_devices("v5e-4")).reshape(2, 2), ("a", "b"))
    x = jax.ShapeDtypeStruct(
        (256, 512), jax.numpy.float32, sharding=NamedSharding(mesh, P("a", "b"))
    )
    out = (NamedSharding(mesh, P("b")), NamedSharding(mesh, P("a")))
    both = jax.jit(lambda x: (x.sum(0), x.sum(1)), out_shardings=out)
    found = collectives(both.lower(x).compile().as_text(), dict(mesh.shape))
    # sum(0): each device's [256] partial column sums (its 256 columns) summed over a
    assert found.bytes[("all-reduce", "a")] == 256 * 4
    # sum(1): each device's [128] partial row sums summed over b
    assert found.bytes[("all-reduce", "b")] == 128 * 4


# -- the evaluation sampler -----------------------------------------------------------------
def test_sampler_flops_match_a_hand_count():
    llama = LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
    )
    # B=3 rows, P=4 prompt slots, N=2 new tokens: S = 6 cache slots.
    # per token and layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x16, down 16x8 multiply-adds
    dense = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 128)
    attention = 2 * 2 * (6 * 2 * 4)  # QK^T and AV over all 6 slots, 2 heads of 4
    blocks = 2 * (4 + 2) * (dense + attention)  # 2 layers, 4 prefill + 2 decode tokens
    logits = 3 * 2 * 8 * 10  # after the prompt and after each of the 2 decode steps
    assert dense == 1152 and attention == 192
    assert sampler_flops(llama, SamplerShape(3, 4, 2)) == 3 * (blocks + logits) == 49824


class _Called(Exception):
    pass


def test_the_abstract_call_lowers_to_the_program_sample_runs(monkeypatch):
    """What `rsa-jax compile` lowers (`sampling_call` on an abstract model) is the jitted
    program `sample` calls, with the same batch size, shardings and argument types."""
    task = SafetyTask()
    tok = make_tokenizer(task)
    config = tiny_config(vocab_size=len(tok), max_position_embeddings=64)

    def make():
        return Llama(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32, compute_dtype=jnp.float32)

    # Shapes only on both sides (initialising real weights would cost more than the rest):
    # `generate` reads nothing of the parameters before the jitted call it hands them to.
    abstract = nnx.eval_shape(make)
    placement = placement_for(None, jax.devices())
    seen = {}

    def record(*args, **static):
        seen["args"], seen["static"] = args, static
        raise _Called

    real = _sampling._generate
    monkeypatch.setattr(_sampling, "_generate", record)
    prompts = ["ask topic0 style1 n2", "ask topic3 style5 n0", "ask topic7 style0 n9"]
    with pytest.raises(_Called):
        sample(
            abstract, tok, prompts, n=2, max_new_tokens=5, template=TEMPLATE, placement=placement
        )
    monkeypatch.undo()
    rows, prompt_len = seen["args"][2].shape
    assert rows == sampling_rows(abstract, placement, prompt_len, 5, 6)
    fn, args, static = sampling_call(
        abstract, rows=rows, prompt_len=prompt_len, max_new_tokens=5, placement=placement
    )
    assert fn is real and static == seen["static"]

    # The same jitted function with the same static arguments (the shardings the sampler pins
    # its rows and KV cache to among them) and arguments of the same shapes, dtypes and
    # shardings: jit traces and lowers the same program. (An uncommitted array, like the key
    # and the scalars `generate` passes, has no sharding of its own: jit places it.)
    def described(tree):
        def sharding(x):
            return x.sharding if getattr(x, "committed", True) else None

        return [(x.shape, x.dtype, sharding(x)) for x in jax.tree.leaves(tree)]

    assert described(args[2:]) == described(seen["args"][2:])
    assert described(args[1]) == described(seen["args"][1])
    assert args[0] == seen["args"][0]  # the graph definition (static)


@needs_libtpu
@pytest.mark.slow
def test_tiny_sampler_compiles_for_a_v5e_4_with_its_roles_and_fits():
    config = load_config(TINY, [*ONE_PROGRAM, "mesh.data=2", "mesh.fsdp=2"])
    before = materialised_bytes()
    said: list[str] = []
    reports = compile_config(config, "v5e-4", eval_rows=64, max_new_tokens=8, say=said.append)
    assert materialised_bytes() == before  # shapes only: no weight was placed
    assert [r.name for r in reports] == [
        "train step of stages 0 (helpfulness), 1 (safety)",
        "eval sampler (64 rows x 128 prompt + 8 new tokens)",
    ]
    r = reports[1]
    assert r.fits and r.memory is not None and r.mesh == {"data": 2, "fsdp": 2, "tensor": 1}
    assert set(r.memory.roles) == {"parameters", "prompts + settings"}
    # float32 merged parameters split over fsdp=2 (the tiny model has no dimension it cannot split)
    assert r.memory.roles["parameters"] == parameter_count(_tiny_llama()) * 4 // 2
    assert r.memory.temporaries > 0 and r.needed_bytes >= sum(r.memory.roles.values())
    # [layers, rows / (data x fsdp), slots, kv heads, head dim] float32, keys and values (rows
    # go over the `batch` rule's axes, data and fsdp)
    tiny = _tiny_llama()
    cache = tiny.num_hidden_layers * (64 // 4) * 136 * tiny.num_key_value_heads * tiny.head_dim * 4
    assert r.created == {"KV cache (keys + values)": 2 * cache}
    assert r.flops == sampler_flops(tiny, SamplerShape(64, 128, 8))
    # FSDP-sharded parameters are gathered over fsdp to compute
    assert r.collectives is not None
    assert any(k == "all-gather" and "fsdp" in axes for k, axes in r.collectives.ops), r.lines()
    said.clear()
    assert report(reports, said.append) == 0
    assert any("KV cache (keys + values)" in line for line in said)


def test_sampler_options_default_to_evals_and_reject_a_bad_value():
    from rsa_jax.cli import build_parser
    from rsa_jax.compile._run import EVAL_MAX_NEW_TOKENS

    eval_args = build_parser().parse_args(["eval", "m", "--out", "o"])
    assert eval_args.max_new_tokens == EVAL_MAX_NEW_TOKENS  # what `rsa-jax eval` samples
    code, out, err = _run(["compile", TINY, "--topology", "v5e-4", "--eval-rows", "0"])
    assert code == 2 and out == ""
    assert err.strip() == "rsa-jax compile: error: --eval-rows must be >= 1, got 0"


@needs_libtpu
@pytest.mark.slow
def test_a_sweeps_variants_send_nothing_to_each_other():
    """K = 4 variants of the tiny two-stage RSA run (`cvar_reference`: the radix select) on a
    v5e-4, one variant per chip. The variants share only the batch and the frozen reference, so
    the compiled sweep step moves nothing over the variant axis. Before the selection kept the
    variant axis its own (`losses.members_split_over`), its histograms were all-reduced across
    the variants at every loop step (28 GiB per chip per step for the Llama-3-8B sweep recipe)."""
    from rsa_jax.compile import compile_config
    from rsa_jax.config import load_config

    config = load_config(TINY, ["model.compute_dtype=bfloat16"])
    reports = compile_config(
        config, "v5e-4", sweep=4, variant_devices=4, sampler=False, say=lambda _: None
    )
    assert reports and all(r.fits for r in reports)
    for program in reports:
        over_variants = {k: v for k, v in program.collectives.bytes.items() if "variant" in k[1]}
        assert over_variants == {}, (program.name, over_variants)
