"""Our train step against PyTorch + transformers on the same machine, side by side.

The same DPO step on SmolLM2-135M (float32, `B` pairs x `L` tokens, 4 x 128 by default): policy
forward+backward, reference forward under no_grad, AdamW with gradient clipping. PyTorch builds
`LlamaForCausalLM` from artifacts/smollm2-135m's config.json and safetensors; ours goes through
the public training API (`Engine`, `Engine.compiled_step`, as bench/train_step.py
does) with our DPO step, our Ra-DPO step (cvar_reference, split vocabulary) with the logits head,
and the same Ra-DPO step with the fused head.

Each side runs in its own worker process (one process tree; both use every core; torch's with
OMP_WAIT_POLICY=PASSIVE unless set, see `Worker`), and the parent
alternates them: repetition r runs `--steps` timed steps of every variant in turn, after one
untimed warm-up step each, so a load change on the shared machine hits both sides alike. Times are
medians over every timed step. Each step also records its process's CPU time and minor page
faults (`getrusage`): `cores` (CPU over wall: how busy the step kept the cores), `cpu_s` (the
work, which decides the time when another process holds a core) and `minor_faults_k`. The last
line is one JSON object with `dpo_ours_over_torch` (our DPO step time over PyTorch's),
`radpo_over_dpo` (our Ra-DPO step over our DPO step) and
`fused_over_logits` (our Ra-DPO step, fused head over logits head), each where both of its
variants ran (`--ours`). `dpo_kl` (not run by default) is the DPO step whose `risk/*` metrics come
from the KL instead of cvar_reference (`dpo_kl_over_dpo`: what the risk head costs a DPO stage).
`--baseline DIR` adds a third worker that imports rsa_jax from DIR (another checkout) and
alternates with the others: before/after numbers of a change in one run (`dpo_over_baseline`).

    pip install -e '.[bench]'            # torch==2.13.0, the CPU wheel (never needed by tests)
    python bench/vs_torch.py             # 4 pairs x 128 tokens, 3 repetitions x 3 steps
    python bench/vs_torch.py --pairs 2 --length 64 --repeats 2 --steps 1 --no-torch   # smoke
    python bench/vs_torch.py --ours dpo,radpo   # skip the fused head (the slowest to compile)
    git archive HEAD~1 rsa_jax | tar -x -C /tmp/old && python bench/vs_torch.py --baseline /tmp/old

torch may live outside the project's environment (it is never needed by the tests): the workers
inherit the environment, so `PYTHONPATH=DIR` with `pip install --target DIR torch==2.13.0` works.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ARTIFACT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "artifacts", "smollm2-135m"
)
# Our variants: (name, stage loss, risk, head). The optimizer and the batch are the same for all.
# A DPO stage's loss ignores its risk, which only defines the `risk/*` metrics: `dpo` computes
# them with cvar_reference (the selection over V included), `dpo_kl` with `kl` (no selection).
OURS = (
    ("dpo", "dpo", "cvar_reference", "logits"),
    ("radpo", "ra_dpo", "cvar_reference", "logits"),
    ("radpo_fused", "ra_dpo", "cvar_reference", "fused"),
    ("dpo_kl", "dpo", "kl", "logits"),
)
DEFAULT_OURS = "dpo,radpo,radpo_fused"
BETA, LR, MAX_GRAD_NORM = 0.1, 2e-5, 1.0


def make_batch(pairs: int, length: int, vocab: int, seed: int = 0) -> dict:
    """[2B, L] rows: a prompt of L/2 tokens then a response of L/2 (no padding), as NumPy."""
    rng = np.random.default_rng(seed)
    rows, prompt = 2 * pairs, length // 2
    ids = rng.integers(10, vocab, (rows, length)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], 1)
    loss_mask = np.zeros((rows, length), bool)
    loss_mask[:, prompt - 1 : -1] = True  # labels of the response tokens
    return dict(
        input_ids=ids,
        positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        attention_mask=np.ones((rows, length), bool),
        labels=labels,
        loss_mask=loss_mask,
    )


# ---------------------------------------------------------------- workers (one per side)


def _torch_worker(args) -> dict:
    """`run()` -> seconds of one PyTorch DPO step."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    policy = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    policy.train()
    reference.eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    batch = {
        k: torch.from_numpy(v)
        for k, v in make_batch(args.pairs, args.length, policy.config.vocab_size).items()
    }
    ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
    positions, labels = batch["positions"].long(), batch["labels"].long()
    loss_mask = batch["loss_mask"].float()

    def seq_logps(model):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        token = torch.gather(logp, 2, labels[..., None])[..., 0]
        return (token * loss_mask).sum(-1)  # [2B]

    def step():
        logp = seq_logps(policy)
        with torch.no_grad():
            ref = seq_logps(reference)
        b = args.pairs
        margin = (logp[:b] - ref[:b]) - (logp[b:] - ref[b:])
        loss = -torch.nn.functional.logsigmoid(BETA * margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        opt.step()
        return loss.item()

    def run():
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    return {"torch_dpo": run}


def our_engine(args):
    """(engine, reference parameters, train state, placed batch) of our side: SmolLM2 from
    `args.model` in float32 (`args.remat`), AdamW with clipping, `args.pairs` x `args.length`."""
    from rsa_jax.config import Config, DataConfig, ModelConfig, OptimConfig
    from rsa_jax.training import Engine, device_copy
    from rsa_jax.training._mesh import place_batch

    optim = OptimConfig(
        learning_rate=LR, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM
    )
    engine = Engine(
        Config(
            model=ModelConfig(path=args.model, compute_dtype="float32", remat=args.remat),
            data=DataConfig(batch_size=args.pairs),
            optim=optim,
        )
    )
    reference = device_copy(engine.initial)
    vocab = engine.model.llama.vocab_size
    batch = place_batch(make_batch(args.pairs, args.length, vocab), engine.layout.batch)
    return engine, reference, engine.new_state(engine.initial), batch


def _jax_worker(args) -> dict:
    """`run()` per variant of OURS -> seconds of one of our steps (compiled before timing)."""
    import jax

    from rsa_jax.config import StageConfig
    from rsa_jax.training import PairObjective, state_shardings

    engine, reference, state, batch = our_engine(args)
    # One train state threads through every variant's step (same structure and shardings), so
    # the process holds one copy of the weights and Adam moments whatever the variant count.
    holder = {"state": state}
    runs = {}
    for name, loss, risk, head in OURS:
        if name not in args.ours.split(","):
            continue
        stage = StageConfig(loss=loss, risk=risk, beta=BETA, mu=0.95, split_vocab=True)
        objective = PairObjective(stage.kernel, head=head, chunk_size=args.chunk)
        step = engine.compiled_step(objective, state_shardings(holder["state"]))
        hyper = engine.hyper(stage, 1000)
        compiled = step.lower(holder["state"], reference, batch, hyper).compile()

        def run(compiled=compiled, hyper=hyper):
            start = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], reference, batch, hyper)
            jax.block_until_ready(metrics)
            return time.perf_counter() - start

        runs[name] = run
    return runs


def _measured(run) -> list[float]:
    """[wall s, CPU s (user + system, every thread of the process), minor page faults] of one
    `run()`. CPU over wall is the cores the step kept busy: 2.0 on two idle cores."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = run()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return [wall, cpu, after.ru_minflt - before.ru_minflt]


def worker_main(args) -> None:
    """Line protocol on stdin/stdout: `names` -> the variant names; `run NAME N` -> N timings."""
    runs = (_torch_worker if args.worker == "torch" else _jax_worker)(args)
    out = sys.__stdout__
    print(json.dumps(sorted(runs)), file=out, flush=True)
    for line in sys.stdin:
        _, name, count = line.split()
        print(json.dumps([_measured(runs[name]) for _ in range(int(count))]), file=out, flush=True)


# ---------------------------------------------------------------- the parent


class Worker:
    def __init__(self, side: str, args, import_path: str | None = None):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", side]
        cmd += ["--model", args.model, "--pairs", str(args.pairs), "--length", str(args.length)]
        cmd += ["--chunk", str(args.chunk), "--ours", args.ours]
        cmd += ["--remat"] if args.remat else []
        env = dict(os.environ)
        if side == "torch":
            # PyTorch's OpenMP threads spin while they wait; on a shared, oversubscribed machine
            # that made a SmolLM2 fwd+bwd at 2 x 32 tokens take 36-52 s instead of 3.3-3.9 s
            # (2 threads, load average about 13). Passive waiting is torch's best setting there.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # A baseline worker imports rsa_jax from another checkout; its variants are NAME@baseline.
        self.suffix = ""
        if import_path is not None:
            env["PYTHONPATH"] = os.pathsep.join([import_path, env.get("PYTHONPATH", "")])
            self.suffix = "@baseline"
        # Worker logs (compiles, warnings) go to the parent's stderr; stdout carries the protocol.
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.names = json.loads(self._readline())

    def _readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[-1]} exited (code {self.proc.wait()})")
        return line

    def run(self, name: str, count: int) -> list[list[float]]:
        """`count` timed steps of `name`: [wall s, CPU s, minor page faults] each."""
        self.proc.stdin.write(f"run {name} {count}\n")
        self.proc.stdin.flush()
        return json.loads(self._readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=ARTIFACT)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--length", type=int, default=128, help="tokens per row (prompt + response)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per repetition")
    p.add_argument("--chunk", type=int, default=64, help="fused-head token chunk")
    p.add_argument("--remat", action="store_true", help="ours: rematerialise every block")
    p.add_argument("--no-torch", action="store_true", help="ours only (no torch installed)")
    p.add_argument(
        "--ours",
        default=DEFAULT_OURS,
        help=f"our variants to run, comma-separated, of {[v[0] for v in OURS]} (default: "
        f"{DEFAULT_OURS}); each ratio is printed where both its variants ran",
    )
    p.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run our variants with rsa_jax imported from DIR (e.g. a checkout of an older "
        "commit), alternating with the rest: `NAME@baseline` times and `*_over_baseline` ratios",
    )
    p.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    args = p.parse_args()
    unknown = set(args.ours.split(",")) - {v[0] for v in OURS}
    if unknown:
        p.error(f"--ours: unknown variant(s) {sorted(unknown)}; choose from {[v[0] for v in OURS]}")
    if args.worker:
        worker_main(args)
        return
    load0 = os.getloadavg()
    print(
        f"SmolLM2-135M, {args.pairs} pairs x {args.length} tokens, float32, remat={args.remat}; "
        f"{os.cpu_count()} cpus, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
        flush=True,
    )
    workers = [Worker("jax", args)]
    if args.baseline:
        workers.append(Worker("jax", args, import_path=os.path.abspath(args.baseline)))
    if not args.no_torch:
        workers.append(Worker("torch", args))
    times: dict[str, list[float]] = {}
    # Per step: cores used (CPU s / wall s), CPU seconds, minor page faults (fresh memory).
    cores: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    faults: dict[str, list[float]] = {}
    try:
        for w in workers:  # warm-up: one untimed step of every variant
            for name in w.names:
                w.run(name, 1)
        for r in range(args.repeats):
            order = workers if r % 2 == 0 else workers[::-1]
            for w in order:
                for name in w.names:
                    got = w.run(name, args.steps)
                    key = name + w.suffix
                    times.setdefault(key, []).extend(g[0] for g in got)
                    cores.setdefault(key, []).extend(g[1] / g[0] for g in got)
                    cpu.setdefault(key, []).extend(g[1] for g in got)
                    faults.setdefault(key, []).extend(g[2] for g in got)
                    steps = " ".join(f"{g[0]:.3f} ({g[1] / g[0]:.2f} cores)" for g in got)
                    print(f"rep {r}: {key:18s} {steps}", flush=True)
    finally:
        for w in workers:
            w.close()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tokens = 2 * args.pairs * args.length
    for name, t in med.items():
        print(f"{name:18s} median {t:.3f} s  {tokens / t:,.0f} tokens/s", flush=True)
    load1 = os.getloadavg()
    result = {
        "pairs": args.pairs,
        "length": args.length,
        "remat": args.remat,
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "cores": {k: round(statistics.median(v), 2) for k, v in cores.items()},
        "cpu_s": {k: round(statistics.median(v), 2) for k, v in cpu.items()},
        "minor_faults_k": {k: round(statistics.median(v) / 1e3) for k, v in faults.items()},
        "load_average": [round(load0[0], 2), round(load1[0], 2)],
    }
    ratios = {  # name: (numerator, denominator), reported where both ran
        "radpo_over_dpo": ("radpo", "dpo"),
        "fused_over_logits": ("radpo_fused", "radpo"),
        "dpo_ours_over_torch": ("dpo", "torch_dpo"),
        "radpo_ours_over_torch_dpo": ("radpo", "torch_dpo"),
        "dpo_kl_over_dpo": ("dpo_kl", "dpo"),
    }
    for name, _, _, _ in OURS:
        ratios[f"{name}_over_baseline"] = (name, f"{name}@baseline")
    for key, (num, den) in ratios.items():
        if num in med and den in med:
            result[key] = round(med[num] / med[den], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
