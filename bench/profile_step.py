"""Where our train step spends its time on the CPU: a `jax.profiler` trace of the compiled step,
summed per XLA operation and per kind of operation.

The step is `bench/vs_torch.py`'s (SmolLM2-135M, float32, `B` pairs x `L` tokens, AdamW with
clipping, through `Engine.compiled_step`). After one untimed step it traces `--steps` steps,
reads the trace back (`jax.profiler.ProfileData`, no TensorBoard needed) and adds up the events
XLA's CPU runtime records per executed operation (thunk). Each operation is classed from the
optimised HLO (`Compiled.as_text()`): matmul (a dot, or a fusion around one), transpose/copy,
reduce, gather/scatter, loop fusion (elementwise), other; loops (`while`) are containers, their
bodies' operations are counted instead. Operations run on several threads at once, so their sum
can exceed the step's wall clock (the median, printed alongside); shares are of that sum.

    python bench/profile_step.py                          # DPO, logits head, 4 x 128
    python bench/profile_step.py --loss ra_dpo --top 40
    python bench/profile_step.py --pairs 1 --length 32 --steps 1    # quick look
    python bench/profile_step.py --analyse /tmp/trace      # read back a kept --trace-dir

Each operation is also attributed to the Python line that made it (the HLO's stack frames), and
summed per source file: the model's matmuls, the loss head, the selection of cvar_reference, the
optimizer. Fusions are attributed to their root operation's line.

The last line is one JSON object: step seconds and each kind's share of the operations' time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import tempfile
import time

# XLA's CPU runtime records one trace event per executed operation only with this flag; it must
# be set before jax initialises its backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import jax  # noqa: E402
from jax.profiler import ProfileData
from vs_torch import ARTIFACT, BETA, our_engine  # noqa: E402

from rsa_jax.config import StageConfig  # noqa: E402
from rsa_jax.training import PairObjective, state_shardings  # noqa: E402

# Trace events of XLA's CPU runtime that are bookkeeping, not an operation.
_SKIP = re.compile(
    r"^(end: |ThreadpoolListener|ThunkExecutor|SlinkyThreadPool|\$|Pjit|CommonPjRt|ParseArguments|"
    r"Python)"
)


def build(args):
    """(compiled step, state, reference, batch, hyper) for the chosen loss and head."""
    engine, reference, state, batch = our_engine(args)
    stage = StageConfig(loss=args.loss, risk=args.risk, beta=BETA, mu=0.95, split_vocab=True)
    objective = PairObjective(stage.kernel, head=args.head, chunk_size=args.chunk)
    step = engine.compiled_step(objective, state_shardings(state))
    hyper = engine.hyper(stage, 1000)
    compiled = step.lower(state, reference, batch, hyper).compile()
    return compiled, state, reference, batch, hyper


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind, from optimised HLO text (fusions by what they contain)."""
    computations: dict[str, str] = {}  # computation name -> its body text
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            computations[current] = ""
        elif current is not None:
            computations[current] += line + "\n"

    def body_kind(name: str, depth: int = 0) -> str:
        body = computations.get(name, "")
        if re.search(r"\b(dot|convolution)\(", body):
            return "matmul"
        if depth < 3:
            for callee in re.findall(r"calls=%?([\w.\-]+)", body):
                if body_kind(callee, depth + 1) == "matmul":
                    return "matmul"
        if re.search(r"\b(gather|scatter|dynamic-slice|dynamic-update-slice)\(", body):
            return "gather/scatter"
        if re.search(r"\breduce(-window)?\(", body):
            return "reduce"
        if re.search(r"\b(transpose|copy)\(", body):
            return "transpose/copy"
        return "loop fusion"

    kinds = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line)
        if not m:
            continue
        name, opcode = m.groups()
        if opcode == "fusion":
            callee = re.search(r"calls=%?([\w.\-]+)", line)
            kinds[name] = body_kind(callee.group(1)) if callee else "loop fusion"
        elif opcode in ("dot", "convolution", "custom-call"):
            kinds[name] = "matmul" if opcode != "custom-call" else "other"
        elif opcode in ("transpose", "copy", "copy-start", "copy-done"):
            kinds[name] = "transpose/copy"
        elif opcode in ("reduce", "reduce-window"):
            kinds[name] = "reduce"
        elif opcode in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice"):
            kinds[name] = "gather/scatter"
        elif opcode in ("while", "conditional", "call"):
            kinds[name] = "while"
        else:
            kinds[name] = "other"
    return kinds


def op_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> "file:function" of the Python line that made it (the innermost
    frame of its `stack_frame_id`, from the module's FileNames/FunctionNames/FileLocations/
    StackFrames tables), or "?" where the HLO carries none."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            tables[section] = {}
        elif section and (m := re.match(r"^(\d+) (.*)$", line)):
            tables[section][int(m.group(1))] = m.group(2)
        elif not line.strip():
            section = None
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations, frames = tables.get("FileLocations", {}), tables.get("StackFrames", {})

    def label(frame_id: int) -> str:
        frame = re.search(r"file_location_id=(\d+)", frames.get(frame_id, ""))
        loc = locations.get(int(frame.group(1)), "") if frame else ""
        ids = re.search(r"file_name_id=(\d+) function_name_id=(\d+)", loc)
        if not ids:
            return "?"
        path = files.get(int(ids.group(1)), "?").strip('"')
        short = "/".join(path.split("/")[-2:])
        return f"{short}:{functions.get(int(ids.group(2)), '?').strip(chr(34))}"

    sources = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*stack_frame_id=(\d+)", line)
        if m:
            sources[m.group(1)] = label(int(m.group(2)))
    return sources


def read_trace(trace_dir: str, steps: int) -> dict[str, float]:
    """Operation name -> seconds per step, from the newest trace under `trace_dir`."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    per_op: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            # Operations run on the client's thread and on XLA's Eigen pool threads at once.
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if not _SKIP.match(event.name):
                    per_op[event.name] += event.duration_ns / 1e9 / steps
    return per_op


def report(per_op: dict[str, float], hlo: str, step_s: float, top: int) -> dict:
    """Prints the tables; returns the shares by kind and by source file."""
    kinds, sources = op_kinds(hlo), op_sources(hlo)
    # Loops contain their body's operations (nested events): left out of the sums.
    leaves = {k: v for k, v in per_op.items() if kinds.get(k) != "while"}
    total = sum(leaves.values())
    per_kind: dict[str, float] = collections.defaultdict(float)
    per_file: dict[str, float] = collections.defaultdict(float)
    for name, secs in leaves.items():
        per_kind[kinds.get(name, "other")] += secs
        per_file[sources.get(name, "?").split(":")[0]] += secs
    print(
        f"step {step_s:.3f} s; operations {total:.3f} s "
        f"(summed over XLA's threads, so it can exceed the step)"
    )
    print(f"{'operation':32s} {'kind':15s} {'s/step':>8s} {'share':>6s}  source")
    for name, secs in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        kind, source = kinds.get(name, "other"), sources.get(name, "?")
        print(f"{name[:32]:32s} {kind:15s} {secs:8.3f} {secs / total:6.1%}  {source}")
    print("by kind (share of the operations' time):")
    for kind, secs in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:15s} {secs:8.3f} s {secs / total:6.1%}")
    print("by source file (the Python line each operation came from):")
    for path, secs in sorted(per_file.items(), key=lambda kv: -kv[1]):
        print(f"  {path:32s} {secs:8.3f} s {secs / total:6.1%}")
    return {
        "share": {k: round(v / total, 3) for k, v in per_kind.items()},
        "share_by_file": {k: round(v / total, 3) for k, v in per_file.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=ARTIFACT)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--loss", default="dpo", choices=["dpo", "ra_dpo", "tdpo"])
    p.add_argument("--risk", default="cvar_reference")
    p.add_argument("--head", default="logits", choices=["logits", "fused"])
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--steps", type=int, default=2, help="traced steps")
    p.add_argument("--top", type=int, default=25, help="operations listed")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temp dir)")
    p.add_argument(
        "--analyse", metavar="DIR", help="only read back an earlier run's --trace-dir (1 step)"
    )
    args = p.parse_args()
    if args.analyse:
        with open(os.path.join(args.analyse, "step.hlo.txt")) as f:
            hlo = f.read()
        shares = report(read_trace(args.analyse, 1), hlo, float("nan"), args.top)
        print(json.dumps({**shares, "trace": args.analyse}))
        return
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    t0 = time.perf_counter()
    compiled, state, reference, batch, hyper = build(args)
    print(f"compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    hlo = compiled.as_text()
    state, metrics = compiled(state, reference, batch, hyper)  # warm-up
    jax.block_until_ready(metrics)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:  # to read an operation's HLO
        f.write(hlo)
    times = []
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, reference, batch, hyper)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    step_s = statistics.median(times)
    print(f"median of {args.steps} traced steps:")
    shares = report(read_trace(trace_dir, args.steps), hlo, step_s, args.top)
    print(
        json.dumps(
            {
                "loss": args.loss,
                "head": args.head,
                "remat": args.remat,
                "step_s": round(step_s, 4),
                **shares,
                "trace": trace_dir,
            }
        )
    )


if __name__ == "__main__":
    main()
