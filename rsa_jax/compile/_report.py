"""What a compiled program costs: per-chip memory by role, analytic FLOPs, collectives.

- Memory: `compiled.memory_analysis()` is XLA's buffer assignment for one device: arguments,
  outputs (less what aliases a donated argument) and temporaries. The arguments are split by
  role (parameters, optimizer state, reference or frozen base, batch and hyperparameters) from
  the abstract inputs' per-shard sizes; what the compiler adds on top (tile padding) is shown.
- FLOPs: counted from the architecture and the step's shape (`step_flops`; the evaluation
  sampler's: `sampler_flops`), never from
  `compiled.cost_analysis()`, which counts a while/scan body once (scanned layers, microbatches,
  the fused head's chunks, the risk head's selection loops) instead of times its trip count.
- Collectives: the compiled HLO text's all-reduce, all-gather, reduce-scatter, all-to-all and
  collective-permute ops, by kind and mesh axis (from their replica groups), with bytes per step:
  each op's full array over its group (the larger of operand and result), times the trip counts
  of the while loops around it (loops without a known trip count are counted once and flagged).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from rsa_jax.models import LlamaConfig

GIB = 1024**3


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# -- memory ----------------------------------------------------------------------------------
def shard_bytes(tree) -> int:
    """Bytes one device holds of the abstract arrays of `tree` (ShapeDtypeStructs with
    shardings; 4-bit dtypes count half a byte)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        dtype = leaf.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):  # a PRNG key: its raw words
            raw = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
            shape, dtype = (*shape, *raw.shape), raw.dtype
        bits = jax.dtypes.itemsize_bits(dtype)
        total += math.prod(shape) * bits // 8
    return total


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of one compiled program."""

    roles: dict[str, int]  # argument bytes by role, from the abstract inputs
    arguments: int  # the compiler's argument bytes
    outputs: int  # not aliased to a donated argument
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.code

    @property
    def padding(self) -> int:
        """Argument bytes the compiler adds beyond the shards' sizes (layout tiles)."""
        return self.arguments - sum(self.roles.values())


def memory_of(compiled, roles: dict[str, int]) -> Memory:
    m = compiled.memory_analysis()
    outputs = max(0, m.output_size_in_bytes - m.alias_size_in_bytes)
    return Memory(
        roles,
        m.argument_size_in_bytes,
        outputs,
        m.temp_size_in_bytes,
        m.generated_code_size_in_bytes,
    )


# -- FLOPs -----------------------------------------------------------------------------------
def _projections(llama: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a decoder block."""
    d, f, hd = llama.hidden_size, llama.intermediate_size, llama.head_dim
    q, kv = llama.num_attention_heads * hd, llama.num_key_value_heads * hd
    return {
        "q": (d, q),
        "k": (d, kv),
        "v": (d, kv),
        "o": (q, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What the FLOP count of one step depends on besides the architecture."""

    rows: int  # sequences per step (2B for pairs)
    length: int  # tokens per row (padded)
    remat: bool  # the policy's blocks run forward twice
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ()
    reference: bool = True  # a reference forward pass (pair objectives)
    reference_adapters: bool = False  # LoRA stage 2: the reference has adapters
    head: str = "fused"  # "fused" or "logits"
    chunk_size: int = 0  # fused head's chunk
    variants: int = 1  # K stacked variants (vmap sweep)


def step_flops(llama: LlamaConfig, s: StepShape) -> float:
    """Matmul and attention FLOPs of one optimizer step (2 per multiply-add), as executed:
    the policy's forward, its rematerialised forward, its backward (input gradients always;
    weight gradients of what is trained), the reference's forward, and the loss head's
    unembedding matmuls (the fused head recomputes all but its last chunk's logits backward).
    Elementwise work (norms, softmax, the risk head's selection, the optimizer) is not counted:
    it is small next to the matmuls of any model worth planning for."""
    tokens = s.rows * s.length
    layers = llama.num_hidden_layers
    projections = _projections(llama)
    dense = 2 * sum(i * o for i, o in projections.values())  # per token, forward
    attention = 4 * s.length * llama.num_attention_heads * llama.head_dim  # QK^T and AV
    adapters = 0
    if s.lora_rank:
        adapters = (
            2 * s.lora_rank * sum(i + o for n, (i, o) in projections.items() if n in s.lora_targets)
        )
    trained = s.lora_rank == 0
    forward = dense + attention + adapters
    # backward: input gradients of every matmul and both attention products (2x their
    # forward), weight gradients of trained weights (the base's when full fine-tuning, the
    # adapters' always with LoRA)
    backward = dense + 2 * attention + 2 * adapters + (dense if trained else 0)
    recompute = forward if s.remat else 0
    skipped = 0
    if not trained:
        # With a frozen base XLA drops what no gradient needs: the rematerialised forward
        # stops before each block's down projection (its output feeds no backward matmul), and
        # the first block's q/k/v input gradient (the embedding is frozen).
        d, f = llama.hidden_size, llama.intermediate_size
        recompute -= 2 * d * f if s.remat else 0
        q, k, v = (projections[n] for n in ("q", "k", "v"))
        skipped = 2 * (q[0] * q[1] + k[0] * k[1] + v[0] * v[1])
    policy = forward + recompute + backward
    ref_adapters = adapters if s.reference_adapters else 0
    reference = dense + attention + ref_adapters if s.reference else 0
    blocks = tokens * (layers * (policy + reference) - skipped)

    vocab = 2 * llama.hidden_size * llama.vocab_size  # per token, one model's logits
    if s.head == "fused" and s.chunk_size:
        c = min(s.chunk_size, s.length)
        chunks = -(-s.length // c)
        padded = s.rows * chunks * c
        recompute = 2 * s.rows * (chunks - 1) * c  # both models, all but the last chunk
        head = vocab * (2 * padded + recompute + padded * (2 if trained else 1))
        if not s.reference:
            head = vocab * padded * (3 if trained else 2)
    else:
        models = 2 if s.reference else 1
        head = vocab * tokens * (models + (2 if trained else 1))
    return float(s.variants * (blocks + head))


@dataclasses.dataclass(frozen=True)
class SamplerShape:
    """What the FLOP count of one evaluation sampling batch depends on besides the
    architecture."""

    rows: int  # B, sampled rows in the batch
    prompt_len: int  # P, prompt slots (left-padded)
    new_tokens: int  # N, max_new_tokens: the decode steps when no row stops early


def sampler_flops(llama: LlamaConfig, s: SamplerShape) -> float:
    """Matmul and attention FLOPs of one `rsa_jax.generate` batch (2 per multiply-add), at its
    most: no row stops early, so the loop runs all N steps.

    With S = P + N cache slots, per row:

        L * (P + N) * (2 * sum_proj(in * out) + 4 * S * H * E)  +  (1 + N) * 2 * D * V

    The prefill runs P tokens and each of the N decode steps one token through every block; the
    cache has S slots from the start, so each query's QK^T and AV span all S of them (masked,
    not skipped). Logits are taken at the prompt's last slot and after each decode step (the
    last step's are computed, then unused). Sampling itself (sort, softmax over V) is not
    counted, as elementwise work is not in `step_flops`.
    """
    slots = s.prompt_len + s.new_tokens
    dense = 2 * sum(i * o for i, o in _projections(llama).values())
    attention = 4 * slots * llama.num_attention_heads * llama.head_dim
    blocks = llama.num_hidden_layers * (s.prompt_len + s.new_tokens) * (dense + attention)
    logits = (1 + s.new_tokens) * 2 * llama.hidden_size * llama.vocab_size
    return float(s.rows * (blocks + logits))


def program_flops(llama: LlamaConfig, shape: StepShape | SamplerShape) -> float:
    """`step_flops` of a train or sweep step, `sampler_flops` of the evaluation sampler."""
    if isinstance(shape, SamplerShape):
        return sampler_flops(llama, shape)
    return step_flops(llama, shape)


# -- collectives -----------------------------------------------------------------------------
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BITS = {
    "pred": 8,
    "s4": 4,
    "u4": 4,
    "s8": 8,
    "u8": 8,
    "s16": 16,
    "u16": 16,
    "f16": 16,
    "bf16": 16,
    "s32": 32,
    "u32": 32,
    "f32": 32,
    "s64": 64,
    "u64": 64,
    "f64": 64,
    "f8e4m3fn": 8,
    "f8e5m2": 8,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_OP = re.compile(r"\s(" + "|".join(KINDS) + r")(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:calls|to_apply|branch_computations|condition)=\{?%?([\w.\-, %]+)\}?")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[0-9,{} ]*\})\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{(\{[0-9,{} ]*\})\}")
# XLA:TPU's form: the groups vary along the listed axes of an iota device mesh.
# With `device_ids=([dims]T(perm))` the mesh's devices are an iota over dims, transposed.
_GROUPS_MESH = re.compile(
    r"replica_groups=mesh\[([^\]]*)\]"
    r"(?:,\s*device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?\s*\{([^}]*)\}"
)
_COND_LIMIT = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")


def _array_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BITS:
            continue
        n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
        total += n * _DTYPE_BITS[dtype] // 8
    return total


def _operands(line: str, start: int) -> str:
    """The text between the parenthesis opened just before `start` and its match."""
    depth = 1
    for i in range(start, len(line)):
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        if depth == 0:
            return line[start:i]
    return line[start:]


def _groups(line: str) -> list[list[int]] | None:
    m = _GROUPS_MESH.search(line)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        over = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4)) if a in names]
        ids = np.arange(math.prod(sizes))
        if m.group(2):
            ids = ids.reshape([int(x) for x in m.group(2).split(",")])
            if m.group(3):
                ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        ids = ids.reshape(sizes)
        rest = [j for j in range(len(sizes)) if j not in over]
        group = math.prod(sizes[j] for j in over)
        return ids.transpose(rest + over).reshape(-1, group).tolist()
    m = _GROUPS_IOTA.search(line)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = _GROUPS_LIST.search(line) or _PAIRS.search(line)
    if m:
        return [
            [int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([0-9, ]*)\}", m.group(1))
        ]
    return None


def _bytes_moved(kind, started, result: str, operands: str, groups) -> float:
    """The full array over the group: the reduced array (all-reduce), the gathered result
    (all-gather), the scattered input (reduce-scatter, result x group), the array itself
    (all-to-all, collective-permute). Compiled TPU HLO prints operands without shapes, so this
    is read from the result type (an async start's result also holds its operands)."""
    group = max((len(g) for g in groups), default=1) if groups else 1
    if kind == "collective-permute" and started:  # (operand, result, u32 contexts)
        return _array_bytes(re.sub(r"u32\[\]\S*", "", result)) / 2
    out = float(_array_bytes(result))
    if kind == "all-gather" and started:  # (operands, results): results are G x the operands
        out = out * group / (group + 1)
    if kind == "reduce-scatter":
        out = out * group
    return max(out, float(_array_bytes(operands)))


def _axes(groups: list[list[int]] | None, mesh_shape: dict[str, int]) -> str:
    """The mesh axes along which a collective's groups vary ("all" without groups)."""
    if not groups or all(len(g) <= 1 for g in groups):
        return "all" if groups is None else "none"
    names, dims = list(mesh_shape), list(mesh_shape.values())
    varying = set()
    for g in groups:
        coords = np.array([np.unravel_index(i, dims) for i in g])
        varying.update(j for j in range(len(dims)) if len(set(coords[:, j])) > 1)
    return "+".join(names[j] for j in sorted(varying)) or "none"


def _trip_count(line: str, condition: list[str]) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count`, or a condition `i < N` on a
    counter from 0 (what scans and fori_loops lower to); None when neither is found."""
    known = _TRIP.search(line)
    if known:
        return int(known.group(1))
    limits = [int(c) for text in condition for c in _COND_LIMIT.findall(text)]
    less = any("direction=LT" in text for text in condition)
    if less and len(limits) == 1:
        return limits[0]
    return None


def _computations(hlo: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("(")[0]:
            name = m.group(1)
            out[name] = []
            if line.startswith("ENTRY"):
                out["__entry__"] = [name]
            continue
        if name is not None:
            out[name].append(line)
    return out


@dataclasses.dataclass
class CollectiveOp:
    """One collective of the compiled HLO: its bytes per call and how often a step runs it
    (the trip counts of the loops around it multiplied), and where it came from: the HLO
    computation it sits in and JAX's `op_name` (the traced function path)."""

    kind: str
    axes: str
    bytes_per_call: float
    calls: float
    computation: str
    op_name: str

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_per_call * self.calls

    def line(self) -> str:
        return (
            f"{human_bytes(self.bytes_per_step):>10}/step = {human_bytes(self.bytes_per_call)} x "
            f"{self.calls:.0f}  {self.kind} over {self.axes}  in {self.computation}: "
            f"{self.op_name or '(no op_name)'}"
        )


@dataclasses.dataclass
class Collectives:
    """Bytes per step and op counts by (kind, mesh axes); `unknown_loops`: while loops whose
    trip count the HLO does not state (their bodies counted once); `largest`: the ops moving
    the most bytes per step, largest first (`--collectives-detail`)."""

    bytes: dict[tuple[str, str], float]
    ops: dict[tuple[str, str], int]
    unknown_loops: int = 0
    largest: tuple[CollectiveOp, ...] = ()

    def lines(self) -> list[str]:
        if not self.ops:
            return ["collectives: none"]
        out = []
        for key in sorted(self.bytes, key=lambda k: -self.bytes[k]):
            kind, axes = key
            out.append(
                f"  {kind:<18} over {axes:<16} {self.ops[key]:>4} op(s)  "
                f"{human_bytes(self.bytes[key]):>10}/step"
            )
        return out


# The ops `Collectives.largest` keeps, and JAX's name of an HLO op (its metadata).
LARGEST_KEPT = 50
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def collectives(hlo: str, mesh_shape: dict[str, int]) -> Collectives:
    """Parses the compiled HLO text; see the module docstring for what is counted."""
    comps = _computations(hlo)
    entry = comps.pop("__entry__", [None])[0]
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    # A fused computation's ops carry no op name; the fusion calling it does.
    caller_op: dict[str, str] = {}
    unknown = 0
    for name, lines in comps.items():
        for line in lines:
            w = _WHILE.search(line)
            if w:
                trip = _trip_count(line, comps.get(w.group(1), []))
                if trip is None:
                    unknown += 1
                calls[name].append((w.group(2), trip or 1))
                continue
            for m in _CALLS.finditer(line):
                for callee in m.group(1).replace("%", "").split(","):
                    callee = callee.strip()
                    if callee in comps:
                        calls[name].append((callee, 1))
                        if (named := _OP_NAME.search(line)) is not None:
                            caller_op.setdefault(callee, named.group(1))
    times: dict[str, float] = defaultdict(float)

    def visit(name: str, mult: float, depth: int = 0) -> None:
        if depth > 64:
            return
        times[name] += mult
        for callee, n in calls.get(name, []):
            visit(callee, mult * n, depth + 1)

    if entry is not None:
        visit(entry, 1.0)
    nbytes: dict[tuple[str, str], float] = defaultdict(float)
    ops: dict[tuple[str, str], int] = defaultdict(int)
    each: list[CollectiveOp] = []
    for name, lines in comps.items():
        mult = times.get(name, 0.0)
        if mult == 0:
            continue
        for line in lines:
            m = _OP.search(line)
            if m is None or "=" not in line[: m.start()]:
                continue
            kind, started = m.group(1), bool(m.group(2))
            result, operands = line[line.index("=") + 1 : m.start()], _operands(line, m.end())
            groups = _groups(line)
            size = _bytes_moved(kind, started, result, operands, groups)
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                # XLA:TPU's reduce-scatter: a fusion of the full array's all-reduce and each
                # chip's slice of it, which XLA:TPU runs as a reduce-scatter
                kind = "reduce-scatter"
            key = (kind, _axes(groups, mesh_shape))
            nbytes[key] += size * mult
            ops[key] += 1
            op_name = _OP_NAME.search(line)
            where = op_name.group(1) if op_name else caller_op.get(name, "")
            each.append(CollectiveOp(kind, key[1], size, mult, name, where))
    each.sort(key=lambda op: -op.bytes_per_step)
    return Collectives(dict(nbytes), dict(ops), unknown, tuple(each[:LARGEST_KEPT]))
