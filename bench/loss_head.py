"""Loss-head benchmark: the logits path against the fused head, and selection against sorting.

For each risk functional, one value-and-grad of the Ra-DPO loss with respect to the policy's final
hidden states and unembedding, on the CPU at SmolLM2-135M sizes by default (B=8 pairs, T=512,
V=49152, D=576):
  * logits path: `logits_pair_loss(h_p @ W_p, h_r @ W_r, ...)`: all [2B, T, V] logits alive;
  * fused path: `fused_pair_loss(h_p, W_p, h_r, W_r, ..., chunk_size=C)`.
Peak memory is XLA's buffer assignment for the compiled step (temporaries + arguments + outputs,
`Compiled.memory_analysis()`), which is what the step needs whatever else the process holds.
Then the risk head alone: value and gradient of the Ra-DPO loss (cvar_reference, split vocabulary)
from the logits of both models (2 pairs x 512 tokens x V by default), with the radix selection
against the previous 32-pass bisection (`kth_smallest_pair_bisect`), both compiled in this run.
Then the `cvar_reference` threshold (torch-semantics quantile of each vocabulary half) by exact
radix selection and by bisection against `jnp.quantile` (a full sort) on the same positions.
Every number is a ratio against a baseline measured in the same run.

    python bench/loss_head.py                 # the full SmolLM2-sized run (several minutes)
    python bench/loss_head.py --demo          # a small, fast run
    python bench/loss_head.py --skip-paths    # the risk head and the threshold only
    python bench/loss_head.py --skip-paths --donate   # ... with the policy logits donated

In a train step the head's logits are the head matmul's output and die in the head, so XLA may
write the head's gradient over them; the risk head's row-block backward does (it reads each block
before writing its gradient there). Called on logits that the caller keeps, it first copies them.
`--donate` gives every head its logits to consume, as a train step does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rsa_jax import losses
from rsa_jax.losses import _risk
from rsa_jax.losses._risk import _linear_quantile, _middle_of_cut

MU = {"cvar_reference": 0.95, "cvar": 0.95, "erm": 5.0, "kl": 0.5}


def _time(fn, *args, repeats: int) -> float:
    """Seconds per call after one warm-up call (the compile is not timed)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def _inputs(b, t, v, d, seed=0):
    rng = np.random.default_rng(seed)
    h_p = jnp.asarray(rng.normal(size=(2 * b, t, d)), jnp.float32)
    w_p = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    h_r = h_p + 0.1 * jnp.asarray(rng.normal(size=h_p.shape), jnp.float32)
    w_r = w_p + 0.01 * jnp.asarray(rng.normal(size=w_p.shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, size=(2 * b, t)), jnp.int32)
    prompt = t // 4
    mask = jnp.asarray(np.arange(t)[None, :].repeat(2 * b, 0) >= prompt)
    return (h_p, w_p, h_r, w_r, labels, mask)


def _steps(risk: str, chunk: int):
    hp = {"mu": MU[risk], "beta": 0.1, "alpha": 0.5, "version": 1}

    def fused(h_p, w_p, h_r, w_r, labels, mask):
        per_pair, _ = losses.fused_pair_loss(
            h_p, w_p, h_r, w_r, labels, mask, risk=risk, chunk_size=chunk, **hp
        )
        return per_pair.mean()

    def logits(h_p, w_p, h_r, w_r, labels, mask):
        per_pair, _ = losses.logits_pair_loss(h_p @ w_p, h_r @ w_r, labels, mask, risk=risk, **hp)
        return per_pair.mean()

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    return {"logits": jax.jit(grad(logits)), "fused": jax.jit(grad(fused))}


def bench_paths(args) -> None:
    inputs = _inputs(args.batch, args.seq, args.vocab, args.dim)
    positions = 2 * args.batch * args.seq
    print(
        f"\n## value-and-grad of the Ra-DPO loss: B={args.batch} pairs, T={args.seq}, "
        f"V={args.vocab}, D={args.dim}, chunk C={args.chunk}, {args.repeats} timed calls each"
    )
    print(
        "| risk | logits pos/s | fused pos/s | fused time / logits time "
        "| logits peak MiB | fused peak MiB | fused mem / logits mem |"
    )
    print("|---|---|---|---|---|---|---|")
    ratios = {}
    for risk in args.risks:
        steps = _steps(risk, args.chunk)
        peaks = {path: _peak_bytes(step.lower(*inputs).compile()) for path, step in steps.items()}
        # Alternate the two paths so that a load change on a shared machine hits both alike.
        times = {path: [] for path in steps}
        for step in steps.values():
            jax.block_until_ready(step(*inputs))  # compile outside the timing
        for _ in range(args.repeats):
            for path, step in steps.items():
                times[path].append(_time(step, *inputs, repeats=1))
        (t_l, m_l), (t_f, m_f) = (
            (float(np.median(times[path])), peaks[path]) for path in ("logits", "fused")
        )
        ratios[f"fused_over_logits_{risk}"] = round(t_f / t_l, 3)
        print(
            f"| {risk} | {positions / t_l:,.0f} | {positions / t_f:,.0f} | {t_f / t_l:.2f} "
            f"| {m_l / 2**20:,.0f} | {m_f / 2**20:,.0f} | {m_f / m_l:.3f} |",
            flush=True,
        )
    print("RESULT " + json.dumps(ratios), flush=True)


def _previous_cut(x, valid, n, tail):
    """`_risk._cut` as it was: the gap around the threshold always from two masked passes."""
    return _middle_of_cut(x, valid, _linear_quantile(x, valid, n, tail))


@contextlib.contextmanager
def _bisection_selection():
    """Trace with the previous selection (32-pass bisection, the gap of the cut from two masked
    passes) in place of the radix select and the gap read off the selected pair.

    A benchmark-only swap of the names `_risk` calls, so both versions compile in one process.
    """
    radix, cut = _risk.kth_smallest_pair, _risk._cut
    _risk.kth_smallest_pair, _risk._cut = losses.kth_smallest_pair_bisect, _previous_cut
    try:
        yield
    finally:
        _risk.kth_smallest_pair, _risk._cut = radix, cut


def _previous_head_loss(policy, ref, labels, mask):
    """The risk head as it was before `blocked_token_stats`: `token_stats` over whole [P, V]
    arrays, then the sequence sums and the Ra-DPO loss (`logits_pair_loss` without the blocks)."""
    tail = losses.quantile_tail(0.95)
    stats = losses.token_stats(
        policy, ref, labels, risk="cvar_reference", mu=0.95, tail=tail, split_vocab=True
    )
    seq = losses.sequence_stats(stats, mask, 1.0)
    b = labels.shape[0] // 2
    chosen, rejected = (jax.tree.map(lambda x, s=s: x[s], seq) for s in (slice(b), slice(b, None)))
    per_pair, _ = losses.ra_dpo(chosen, rejected, beta=0.1, alpha=0.5, version=1)
    return per_pair.mean()


def bench_risk_head(args) -> None:
    b, t, v = args.head_pairs, args.head_seq, args.vocab
    rng = np.random.default_rng(2)
    policy = jnp.asarray(rng.normal(size=(2 * b, t, v)), jnp.float32)
    ref = policy + 0.1 * jnp.asarray(rng.normal(size=policy.shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, size=(2 * b, t)), jnp.int32)
    mask = jnp.asarray(np.arange(t)[None, :].repeat(2 * b, 0) >= t // 4)

    def loss(policy, ref):
        per_pair, _ = losses.logits_pair_loss(
            policy, ref, labels, mask, risk="cvar_reference", split_vocab=True, mu=0.95
        )
        return per_pair.mean()

    def previous(policy, ref):
        return _previous_head_loss(policy, ref, labels, mask)

    donate = (0,) if args.donate else ()

    def compile_(fn):
        return jax.jit(jax.value_and_grad(fn), donate_argnums=donate).lower(policy, ref).compile()

    def fresh():
        # With --donate each call consumes its policy logits (as a train step's head does, where
        # they are the head matmul's output and die there): a new copy per call, made untimed.
        return jax.block_until_ready(jnp.copy(policy)) if args.donate else policy

    heads = {"new": compile_(loss), "whole": compile_(previous)}
    with _bisection_selection():
        heads["old"] = compile_(previous)
    results = {name: fn(fresh(), ref) for name, fn in heads.items()}
    (v_new, g_new), (v_old, g_old) = results["new"], results["old"]
    same_value = float(jnp.abs(v_new - v_old))
    same_grad = float(jnp.max(jnp.abs(g_new - g_old)))
    whole_same = bool(results["whole"][0] == v_old) and bool(jnp.all(results["whole"][1] == g_old))
    # Alternate so that a load change on a shared machine hits every head alike. The process's
    # CPU seconds (all of XLA's threads) are kept too: on a machine shared with other jobs they
    # move less than the wall clock, which waits for the cores.
    times = {name: [] for name in heads}
    cpu = {name: [] for name in heads}
    for _ in range(args.repeats):
        for name, fn in heads.items():
            logits = fresh()
            start, wall = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(logits, ref))
            times[name].append(time.perf_counter() - wall)
            cpu[name].append(time.process_time() - start)
    t_old, t_whole, t_new = (float(np.median(times[k])) for k in ("old", "whole", "new"))
    c_old, c_whole, c_new = (float(np.median(cpu[k])) for k in ("old", "whole", "new"))
    n = 2 * b * t
    print(
        f"\n## risk head: value and gradient from logits, {b} pairs x {t} x V={v}, "
        f"cvar_reference with split, {args.repeats} alternating calls each"
        + (", policy logits donated" if args.donate else "")
    )
    print("| head | positions/s | speed vs the bisection head | CPU seconds: ratio |")
    print("|---|---|---|---|")
    print(f"| whole [P, V] arrays, bisection 32 passes (old) | {n / t_old:,.0f} | 1.00 | 1.00 |")
    print(
        f"| whole [P, V] arrays, radix select | {n / t_whole:,.0f} | {t_old / t_whole:.2f} "
        f"| {c_old / c_whole:.2f} |"
    )
    print(
        f"| row blocks, radix select (new) | {n / t_new:,.0f} | {t_old / t_new:.2f} "
        f"| {c_old / c_new:.2f} |"
    )
    print(f"radix and bisection heads equal bit for bit: {whole_same}")
    print(f"new head vs old: |loss diff| {same_value:.2e}, max |grad diff| {same_grad:.2e}")
    suffix = "_donated" if args.donate else ""
    result = {
        f"risk_head_new_over_old_speed{suffix}": round(t_old / t_new, 3),
        f"risk_head_new_over_old_cpu{suffix}": round(c_old / c_new, 3),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _sort_quantile_halves(d, tail):
    """Baseline: torch.quantile semantics by a full sort (jnp.quantile) of each half."""
    half = d.shape[-1] // 2
    return [jnp.quantile(x, tail, axis=-1, method="linear") for x in (d[:, :half], d[:, half:])]


def _select_quantile_halves(d, tail):
    half = d.shape[-1] // 2
    return [
        _linear_quantile(x, jnp.ones(x.shape, bool), x.shape[-1], tail)
        for x in (d[:, :half], d[:, half:])
    ]


def bench_quantile(args) -> None:
    rng = np.random.default_rng(1)
    d = jnp.asarray(rng.normal(size=(args.quantile_positions, args.vocab)), jnp.float32)
    tail = losses.quantile_tail(0.95)
    sort_fn, select_fn = jax.jit(_sort_quantile_halves), jax.jit(_select_quantile_halves)
    with _bisection_selection():
        bisect_fn = jax.jit(_select_quantile_halves)
        bisect_fn.lower(d, tail).compile()
    want = sort_fn(d, tail)
    agree = all(
        bool(jnp.all(a == b)) or float(jnp.max(jnp.abs(a - b))) < 1e-6
        for got in (select_fn(d, tail), bisect_fn(d, tail))
        for a, b in zip(want, got, strict=True)
    )
    t_sort = _time(sort_fn, d, tail, repeats=args.repeats)
    t_bisect = _time(bisect_fn, d, tail, repeats=args.repeats)
    t_select = _time(select_fn, d, tail, repeats=args.repeats)
    n = args.quantile_positions
    print(
        f"\n## cvar_reference threshold per vocabulary half: {n} positions x V={args.vocab}, "
        f"mu=0.95"
    )
    print("| method | positions/s | speed-up vs sort |")
    print("|---|---|---|")
    print(f"| jnp.quantile (full sort) | {n / t_sort:,.0f} | 1.00 |")
    print(f"| bisection selection (old) | {n / t_bisect:,.0f} | {t_sort / t_bisect:.2f} |")
    print(f"| radix selection (new) | {n / t_select:,.0f} | {t_sort / t_select:.2f} |")
    print(f"thresholds agree with the sort (within 1e-6): {agree}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="pairs (B)")
    parser.add_argument("--seq", type=int, default=512, help="tokens (T)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary (V)")
    parser.add_argument("--dim", type=int, default=576, help="model width (D)")
    parser.add_argument("--chunk", type=int, default=64, help="fused-head chunk (C)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--risks", nargs="+", default=sorted(losses.RISKS))
    parser.add_argument("--quantile-positions", type=int, default=2048)
    parser.add_argument("--skip-paths", action="store_true")
    parser.add_argument("--head-pairs", type=int, default=2, help="risk head: pairs")
    parser.add_argument("--head-seq", type=int, default=512, help="risk head: tokens")
    parser.add_argument("--demo", action="store_true", help="small sizes, runs in about a minute")
    parser.add_argument(
        "--donate",
        action="store_true",
        help="risk head: every head may overwrite its policy logits (as in a train step)",
    )
    args = parser.parse_args()
    if args.demo:
        args.batch, args.seq, args.vocab, args.dim, args.chunk = 2, 128, 8192, 64, 32
        args.quantile_positions, args.repeats = 512, 2
        args.head_pairs, args.head_seq = 2, 64
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    if not args.skip_paths:
        bench_paths(args)
    bench_risk_head(args)
    bench_quantile(args)


if __name__ == "__main__":
    main()
