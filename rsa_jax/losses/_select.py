"""Exact order statistics over the vocabulary axis without sorting it.

Dimension legend: N positions (any leading shape), V vocabulary, H halves (1 or 2), W half width,
G rows selected together, S = ceil(N / G) steps, R radix digit bins.

The risk terms need, per position, either the k-th smallest of the V values `d_t(v)` (the unweighted
quantile of `cvar_reference`) or the smallest value whose upper tail carries at most a given
probability mass (the weighted quantile of textbook `cvar`). A float32 maps to a uint32 key whose
unsigned order is the float order, so both become searches over keys, exact by construction (the
result is always one of the input values, with ties handled as a sort would):

* `kth_smallest_pair` (the rank is an integer) is a radix select: passes fix the next digit of
  the k-th key (11, 11, then 10 bits) from a histogram of that digit among the keys that share
  the digits fixed so far. Two shortcuts, each checked and exact: the first digit comes from a
  histogram of every 16th key and one counting pass (`_first_digit_from_sample`), and after 22
  bits x_k sits among one to three keys in nearly every row, which one fused pass of minima,
  maxima and sums reads off (`_pair_from_group`) instead of the last histogram. Where a check
  fails for some row of a step, that step runs the full pass. The rows go G at a time through
  a `lax.fori_loop`, so each step's G x W keys stay in cache across its passes (the vocabulary
  axis is far larger than the cache, and a pass over all N x V keys at once is bound by memory
  bandwidth). Where the rows are split over devices (`rows_split_over`, the risk head on a
  mesh; `members_split_over`, a sweep's variants) both shortcuts are off and each row gets its
  own histogram scatter, so no step votes or gathers across devices (`_kth_pair_keys`).
* `upper_tail_atom` (the predicate is a float sum of weights) bisects on the key: 32 halvings of
  the key range, each one compare-and-reduce pass over V. Its sums are kept exactly as they are.

Both are O(V) per pass with no data movement, several times faster than an O(V log V) sort on
CPU and accelerators. `kth_smallest_pair_bisect` keeps the 32-pass bisection for the rank search
(the baseline of `bench/loss_head.py` and an independent check in the tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# NumPy scalars, not jnp: a jax array at import time would start the XLA backend, and then
# jax.distributed.initialize (multi-process training) can no longer run.
_SIGN = np.uint32(0x80000000)
_ALL = np.uint32(0xFFFFFFFF)
# 32 halvings exhaust any uint32 range.
_BISECTION_STEPS = 32
# Radix digits of the 32-bit key, most significant first: histogram passes of at most 2048 bins
# (one pass fewer over the keys than four 8-bit digits, at about the same speed, and the
# histograms stay small next to a W = 24576 row). The last one runs only where the group left by
# the others is too large for `_pair_from_group`. Other splits ((12, 10, 10), (12, 11, 9)) were no
# faster (docs/benchmarks.md, "Design measurements").
_DIGITS = (11, 11, 10)
# The bits that the histogram passes of all digits but the last one fix (the top 22).
_LEADING_MASK = np.uint32(((1 << sum(_DIGITS[:-1])) - 1) << _DIGITS[-1])
# The first digit's bin is guessed from every 16th key and checked by counting, over all keys,
# those below each of the 5 bins around the guess (`_first_digit_from_sample`): one counting pass
# instead of a full first histogram pass. The sample's rank error is about 4 sqrt(k) keys; 5 bins
# cover it in every row of normal, Student-t (3 degrees), Cauchy and log-normal rows tried, 3
# bins in only 50% to 100% of their 16-row steps. Where the true bin is farther off, as in a
# two-scale mixture (90% of the values normal with std 1e-3, 10% with std 1), the full pass runs
# after the guess, so a wrong guess costs one pass and never the result.
_SAMPLE_STRIDE = 16
_FIRST_DIGIT_GUESSES = 5
# Rows per loop step: 16 rows of a 49152-entry vocabulary half are 16 x 96 KiB of keys, which
# stay in a CPU's L2/L3 caches across the digit passes. It is also what a row block of the risk
# head hands over (8 positions x 2 vocabulary halves, `_row_blocks.BLOCK_ROWS`), so there the
# selection is one loop step instead of two. The G axis is the leading one of the [G, S, W]
# layout, so rows sharded over devices stay sharded (each device scans its own rows) as long as
# G is a multiple of the devices they are split over: `rows_split_over`.
_GROUP_ROWS = 16
# Devices the rows of a selection are split over, in contiguous blocks (the risk head's row
# blocks set it while their forward pass is traced: `rows_split_over`). A context, not an
# argument, because the selection sits under every risk's signature; it only shapes the loop.
_ROW_SHARDS: contextvars.ContextVar[int] = contextvars.ContextVar("rows_split_over", default=1)


# Devices the members of a vmapped selection are split over (a sweep's variants, `vmap` with
# `spmd_axis_name`): set around the whole vmapped call (`members_split_over`), where the batching
# rule of `_kth_pair_rows` runs.
_MEMBER_SHARDS: contextvars.ContextVar[int] = contextvars.ContextVar(
    "members_split_over", default=1
)


@contextlib.contextmanager
def members_split_over(devices: int):
    """While tracing a `vmap` inside it, a selection's mapped axis is taken to be split over
    `devices` devices (the sweep's variant axis): its loop keeps that axis as its own instead of
    joining it to the rows, so each device steps over its own variants' rows
    (`_kth_pair_member_loop`)."""
    token = _MEMBER_SHARDS.set(int(devices))
    try:
        yield
    finally:
        _MEMBER_SHARDS.reset(token)


@contextlib.contextmanager
def rows_split_over(shards: int):
    """While tracing inside it, the selections' [G, S, W] loops take G a multiple of `shards`
    (when it divides the rows), so the rows of each device stay on it: with G < shards the S
    axis is sharded too and SPMD all-gathers every key at every loop step."""
    token = _ROW_SHARDS.set(int(shards))
    try:
        yield
    finally:
        _ROW_SHARDS.reset(token)


def group_rows(n: int, shards: int = 1) -> int:
    """G, the rows per loop step of a selection over n rows split over `shards` devices:
    `_GROUP_ROWS` per device."""
    if shards > 1 and n % shards == 0:
        return shards * min(_GROUP_ROWS, n // shards)
    return min(_GROUP_ROWS, n)


def float_to_key(x: jax.Array) -> jax.Array:
    """Maps float32 to uint32 so that unsigned key order is float order (-0 just below +0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_to_float(key: jax.Array) -> jax.Array:
    """Inverse of `float_to_key`."""
    bits = jnp.where(key & _SIGN, key & ~_SIGN, ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bisect(keys: jax.Array, valid: jax.Array, predicate) -> jax.Array:
    """Smallest key K in [min(keys), max(keys)] with predicate(keys, K) true.

    Args:
      keys: [..., W] uint32 keys.
      valid: [..., W] bool, False on padding (padding never bounds the search range).
      predicate: (keys [..., W], K [...]) -> [...] bool, monotone in K (false then true), true at
        the largest valid key.

    Returns:
      [...] uint32, the smallest valid-range K where the predicate holds (always a key in `keys`
      when the predicate only changes value at keys).
    """
    lo = jnp.min(jnp.where(valid, keys, _ALL), axis=-1)
    hi = jnp.max(jnp.where(valid, keys, jnp.uint32(0)), axis=-1)
    # Search (lo - 1, hi] with predicate(hi) true. `lo - 1` wraps only for the NaN key 0, which
    # the public entry points reject.
    smallest = lo

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // jnp.uint32(2)
        ok = predicate(keys, mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (lo - jnp.uint32(1), hi))
    # When the predicate already holds below the smallest key, the answer is the smallest key.
    return jnp.maximum(hi, smallest)


# Histogram bins per chunk in `_bin_holding`.
_CHUNK_BINS = 32


def _prefix_sums(x: jax.Array) -> jax.Array:
    """Inclusive prefix sums of a [G, C] int32 array along C, as one small matmul with a lower
    triangle of ones: exact, since every sum here counts keys of one row (below 2^24, float32's
    integer range; HIGHEST keeps accelerators from rounding the inputs to tf32/bf16)."""
    ones = np.tril(np.ones((x.shape[-1], x.shape[-1]), np.float32))
    sums = jnp.dot(x.astype(jnp.float32), ones.T, precision=jax.lax.Precision.HIGHEST)
    return sums.astype(jnp.int32)


def _bin_holding(counts: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The bin of a histogram that holds the key of a given rank, and the rank within that bin.

    Args:
      counts: [G, R] int32 histogram (R a multiple of `_CHUNK_BINS`); rank: [G] int32 with
        0 <= rank < counts.sum(-1).
    Returns:
      (bin, rank_in_bin): [G] int32 each, the first bin whose running count exceeds rank.

    In two levels, chunks of 32 bins then the bins of the chunk found: `jnp.cumsum` over all R
    bins lowers to a reduce-window on XLA's CPU backend, an order of magnitude slower than this
    (docs/benchmarks.md, "Design measurements").
    """
    g, bins = counts.shape
    chunks = counts.reshape(g, bins // _CHUNK_BINS, _CHUNK_BINS)
    through = _prefix_sums(jnp.sum(chunks, axis=-1))  # [G, C] keys in chunks <= c

    def first_past(through, rank):  # the first column whose running count exceeds rank
        col = jnp.sum(through <= rank[:, None], axis=-1, dtype=jnp.int32)
        before = jnp.take_along_axis(through, jnp.maximum(col - 1, 0)[:, None], axis=-1)[:, 0]
        return col, jnp.where(col > 0, before, 0)

    chunk, before = first_past(through, rank)
    inside = jnp.take_along_axis(chunks, chunk[:, None, None], axis=1)[:, 0]  # [G, 32]
    column, before_in = first_past(_prefix_sums(inside), rank - before)
    return chunk * _CHUNK_BINS + column, rank - before - before_in


def _row_reductions(operands, inits, combiners) -> tuple[jax.Array, ...]:
    """Several reductions over the last axis of same-shaped [G, W] arrays, as one pass.

    One variadic `lax.reduce` with elementwise combiners (min, max, add). Why not `jnp.min` etc.:
    XLA's CPU backend (jax 0.10.2) rewrites a single-operand reduction over a long row into a
    reduce-window tree and writes its masked input out first, many times slower than a variadic
    reduce, which stays one fused loop. Every output must be used: XLA drops unused ones, and a
    lone survivor is rewritten again.
    """
    axis = operands[0].ndim - 1
    inits = tuple(jnp.asarray(init, x.dtype) for init, x in zip(inits, operands, strict=True))
    return tuple(
        jax.lax.reduce(
            tuple(operands),
            inits,
            lambda a, b: tuple(f(x, y) for f, x, y in zip(combiners, a, b, strict=True)),
            (axis,),
        )
    )


def _digit_pass(keys, prefix, fixed, rank, shift, bits, split=False):
    """One radix pass: the histogram of the digit `(key >> shift) % 2^bits` among the keys of
    each row that share the row's fixed bits, and the bin that holds the row's rank.

    Args:
      keys: [G, W] uint32; prefix: [G] uint32, the bits fixed so far in place (the others zero);
      fixed: numpy uint32 mask of those bits; rank: [G] int32 rank of the answer among the keys
      that share `prefix`; shift, bits: the digit's place and width; split: the G rows are
      split over devices (one scatter per row instead of `_flat_histogram`).
    Returns:
      (prefix, fixed, rank, counts, chosen): the prefix and mask with the digit fixed, the rank
      within the chosen bin, the [G, 2^bits] int32 histogram and the [G] int32 chosen bins.
    """
    bins = 1 << bits
    digit = ((keys >> shift) & np.uint32(bins - 1)).astype(jnp.int32)  # [G, W]
    if split:
        # One scatter per row (vmapped: the rows are the scatter's batch dimension, which the
        # SPMD partitioner keeps on each row's device). `_flat_histogram`'s one scatter would
        # all-gather its indices over the devices the rows are split over.
        if fixed:
            digit = jnp.where((keys & fixed) == prefix[:, None], digit, bins)  # dropped
        counts = jax.vmap(lambda d: jnp.zeros((bins,), jnp.int32).at[d].add(1, mode="drop"))(digit)
    else:
        counts = _flat_histogram(keys, digit, prefix, fixed, bins)
    chosen, rank = _bin_holding(counts, rank)
    prefix = prefix | (chosen.astype(jnp.uint32) << np.uint32(shift))
    return prefix, np.uint32(fixed | ((bins - 1) << shift)), rank, counts, chosen


def _flat_histogram(keys, digit, prefix, fixed, bins) -> jax.Array:
    """[G, R] counts of each row's digits among its keys that share `prefix` (`fixed` bits)."""
    g = keys.shape[0]
    # A scatter-add histogram (XLA has no histogram primitive): O(W), one pass. The G rows share
    # one flat [G * R] array (row r's bins from r * R), and keys outside the row's current prefix
    # group get an out-of-range index that the scatter drops: faster than a scatter vmapped over
    # rows, and than counting the outside keys in an extra bin (all of them would hit that one
    # counter, one after the other).
    index = digit + (jnp.arange(g, dtype=jnp.int32) * bins)[:, None]
    if fixed:
        index = jnp.where((keys & fixed) == prefix[:, None], index, g * bins)
    # The scatter adds an array of ones, which XLA would otherwise sink into the loop around this
    # (`WhileLoopConstantSinking`) and write out at every step: the barrier keeps it one array
    # made once.
    ones = jax.lax.optimization_barrier(jnp.ones((index.size,), jnp.int32))
    counts = jnp.zeros((g * bins,), jnp.int32)
    return counts.at[index.reshape(-1)].add(ones, mode="drop").reshape(g, bins)


class _Group(NamedTuple):
    """Where the radix select stands after all but the last digit: per row ([G] each), the keys
    that share the bits fixed so far (`_LEADING_MASK`) form the row's group g_0 <= ... <= g_(c-1),
    and x_k is g_r."""

    prefix: jax.Array  # uint32, the fixed bits in place, the others zero
    rank: jax.Array  # int32 r
    count: jax.Array  # int32 c


def _first_digit_from_sample(keys: jax.Array, k: jax.Array):
    """The first digit of x_k (the top `_DIGITS[0]` bits) guessed from a sample and checked.

    A histogram of every `_SAMPLE_STRIDE`-th key guesses the bin of x_k; one fused pass then
    counts, over all keys, those below each of the `_FIRST_DIGIT_GUESSES` bins around the guess
    and past them, which decides the bin where one of them holds rank k (exactly: the guess is
    only where to look).

    Args:
      keys: [G, W] uint32; k: [G] int32.
    Returns:
      (prefix, rank, found): [G] each, the bin in place (uint32), k's rank among its keys
      (int32) and whether it is one of the bins looked at (bool; elsewhere the rest is
      meaningless).
    """
    g = keys.shape[0]
    bits = _DIGITS[0]
    shift = 32 - bits
    sample = keys[:, ::_SAMPLE_STRIDE]
    k_sample = jnp.minimum(k // _SAMPLE_STRIDE, sample.shape[1] - 1)
    *_, guess = _digit_pass(
        sample, jnp.zeros((g,), jnp.uint32), np.uint32(0), k_sample, shift, bits
    )
    # Bins may run past [0, 2^bits): below those, no key or all of them.
    starts = [guess + (i - _FIRST_DIGIT_GUESSES // 2) for i in range(_FIRST_DIGIT_GUESSES + 1)]
    digit = (keys >> shift).astype(jnp.int32)
    below = _row_reductions(
        tuple(jnp.where(digit < start[:, None], 1, 0) for start in starts),
        (0,) * len(starts),
        (jnp.add,) * len(starts),
    )
    found = jnp.zeros((g,), bool)
    chosen, rank = guess, k
    for start, before, through in zip(starts, below, below[1:], strict=False):
        here = (before <= k) & (k < through)
        chosen = jnp.where(here, start, chosen)
        rank = jnp.where(here, k - before, rank)
        found = found | here
    return chosen.astype(jnp.uint32) << np.uint32(shift), rank, found


def _leading_digits(keys: jax.Array, k: jax.Array, split: bool = False) -> _Group:
    """The histogram passes of all digits but the last one. keys: [G, W] uint32; k: [G] int32.

    The first digit comes from `_first_digit_from_sample` where it finds every row's bin (a
    histogram of a sixteenth of the keys and one fused counting pass cost about a third of a
    histogram pass over all keys), else from a full histogram pass (`cond`); with `split` (rows
    split over devices: `_kth_pair_keys`), from the full pass.
    """
    g = keys.shape[0]
    shift = 32 - _DIGITS[0]

    def first_pass():
        prefix, _, rank, _, _ = _digit_pass(
            keys, jnp.zeros((g,), jnp.uint32), np.uint32(0), k, shift, _DIGITS[0], split
        )
        return prefix, rank

    if not split:
        prefix, rank, found = _first_digit_from_sample(keys, k)
        prefix, rank = jax.lax.cond(jnp.all(found), lambda: (prefix, rank), first_pass)
    else:
        prefix, rank = first_pass()
    fixed = np.uint32(((1 << _DIGITS[0]) - 1) << shift)  # mask of the bits fixed so far
    count = jnp.full((g,), keys.shape[1], jnp.int32)
    for bits in _DIGITS[1:-1]:
        shift -= bits
        prefix, fixed, rank, counts, chosen = _digit_pass(
            keys, prefix, fixed, rank, shift, bits, split
        )
        count = jnp.take_along_axis(counts, chosen[:, None], axis=-1)[:, 0]
    return _Group(prefix, rank, count)


def _next_key(group: _Group, key_k, in_group, above) -> jax.Array:
    """x_(k+1): g_(r+1) (`in_group`) while r + 1 < c, past the group's last key the smallest key
    above the group (`above`); x_k itself where that is padding (the largest key: k + 1 ==
    n_valid, the last order statistic)."""
    following = jnp.where(group.rank + 1 < group.count, in_group, above)
    return jnp.where(following == _ALL, key_k, following)


def _pair_from_group(keys: jax.Array, group: _Group):
    """x_k and x_(k+1) from one fused pass over the keys, where the group shows them.

    The pass (`_row_reductions`) takes the group's smallest and largest key, the sum of their
    low bits and the smallest key above the group. That gives g_0 and g_(c-1), the middle one
    g_1 = sum - g_0 - g_2 when c = 3, and every g_i when the group's keys are all equal; x_(k+1)
    past the group is the key above it.

    Args:
      keys: [G, W] uint32; group: after `_leading_digits`.
    Returns:
      (key_k, key_k1, known, above): [G] each; `known` (bool) marks the rows whose pair the pass
      gives (elsewhere the keys are meaningless); `above` (uint32) is the smallest key above the
      group, `_ALL` if none.
    """
    low = np.uint32(~_LEADING_MASK)  # the bits not fixed yet
    in_group = (keys & _LEADING_MASK) == group.prefix[:, None]
    offset = keys & low
    zero = jnp.zeros_like(keys)
    low_min, low_max, low_sum, above = _row_reductions(
        (
            jnp.where(in_group, offset, low),
            jnp.where(in_group, offset, zero),
            jnp.where(in_group, offset, zero),
            jnp.where(keys > (group.prefix | low)[:, None], keys, _ALL),
        ),
        (low, 0, 0, _ALL),
        (jnp.minimum, jnp.maximum, jnp.add, jnp.minimum),
    )
    count, rank = group.count, group.rank
    same = low_min == low_max

    def group_key(i):  # (g_i, whether the pass gives it) for 0 <= i < count
        middle = low_sum - low_min - low_max  # g_1's low bits when count == 3
        bits = jnp.where(i == 0, low_min, jnp.where(i == count - 1, low_max, middle))
        known = (i == 0) | (i == count - 1) | (count == 3) | same
        return group.prefix | jnp.where(same, low_min, bits), known

    (key_k, known_k), (key_k1, known_k1) = group_key(rank), group_key(rank + 1)
    known = (rank >= 0) & (rank < count) & known_k & (known_k1 | (rank + 1 == count))
    return key_k, _next_key(group, key_k, key_k1, above), known, above


def _pair_from_last_digit(keys: jax.Array, group: _Group, above: jax.Array, split=False):
    """x_k and x_(k+1) from the last digit's histogram pass: its bins are whole keys, so the
    bins holding ranks r and r + 1 of the group are g_r and g_(r+1) (shapes as in
    `_pair_from_group`; `split` as in `_digit_pass`)."""
    bits = _DIGITS[-1]
    prefix_k, _, _, counts, _ = _digit_pass(
        keys, group.prefix, _LEADING_MASK, group.rank, 0, bits, split
    )
    next_bin, _ = _bin_holding(counts, jnp.minimum(group.rank + 1, group.count - 1))
    return prefix_k, _next_key(group, prefix_k, group.prefix | next_bin.astype(jnp.uint32), above)


def _kth_pair_keys(
    keys: jax.Array, k: jax.Array, split: bool = False
) -> tuple[jax.Array, jax.Array]:
    """The k-th and (k+1)-th smallest keys (0-based, with multiplicity) of each row.

    Args:
      keys: [G, W] uint32, padding set to the largest key (it sorts last and k never reaches it).
      k: [G] int32, 0 <= k < number of valid keys of the row.
      split: the G rows are split over devices. A `cond`'s predicate over them would be a
        collective at every loop step (over the DCN when the rows span slices), so the two
        shortcuts below are off: every row runs the full first and last passes, with per-row
        histograms (`_digit_pass`), and nothing crosses devices. The same bits either way.

    Returns:
      (key_k, key_k1): [G] uint32 each; key_k1 = key_k when no key follows (k + 1 == n_valid).

    Radix select: histogram passes fix the digits of `_DIGITS` from the most significant one,
    the first one mostly guessed from a sample and checked (`_leading_digits`). After all but
    the last digit (22 bits: a float's value to about 1e-4 relative) the row's group holding x_k
    has only one to three keys in 99.5% of the benchmark's rows, and one fused pass
    (`_pair_from_group`) reads x_k and x_(k+1) off it. Only where some row of the step needs more
    (a `cond`; 8% of the benchmark's 16-row steps) does the last histogram pass run. Both ways are
    exact. (This is never vmapped: `_kth_pair_rows`' rule puts the members' rows in one loop, so
    the `cond`s stay branches.)
    """
    group = _leading_digits(keys, k, split)
    key_k, key_k1, known, above = _pair_from_group(keys, group)
    if split:
        return _pair_from_last_digit(keys, group, above, split)
    return jax.lax.cond(
        jnp.all(known),
        lambda: (key_k, key_k1),
        lambda: _pair_from_last_digit(keys, group, above),
    )


def kth_smallest_pair(x: jax.Array, k: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The k-th and (k+1)-th smallest (0-based) of the valid entries of each row, as a sort gives.

    Radix select on the float32 bit keys, G rows per scan step (see the module docstring).

    Args:
      x: [..., W] float32 values (bfloat16/float16 are widened exactly).
      k: [...] int32 rank, 0 <= k < n_valid (larger ranks give the last valid entry).
      valid: [..., W] bool mask of the entries that take part (padding False).

    Returns:
      (x_k, x_k1): [...] float32 each; x_k1 = x_k when k + 1 == n_valid (the last order statistic).
    """
    lead = x.shape[:-1]
    keys = jnp.where(valid, float_to_key(x), _ALL)  # padding sorts after everything
    # A rank past the valid entries gives the last one (as the bisection did), never padding.
    n_valid = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    k = jnp.minimum(jnp.broadcast_to(k.astype(jnp.int32), lead), n_valid - 1)
    key_k, key_k1 = _kth_pair_rows(_ROW_SHARDS.get())(keys, k)
    return key_to_float(key_k), key_to_float(key_k1)


def _kth_pair_loop(keys: jax.Array, k: jax.Array, shards: int) -> tuple[jax.Array, jax.Array]:
    """`_kth_pair_keys` of every row, G = `group_rows(n, shards)` rows per loop step.

    Args:
      keys: [..., W] uint32, padding set to the largest key; k: [...] int32, 0 <= k < n_valid;
      shards: the devices the rows are split over, in contiguous runs.
    Returns:
      (key_k, key_k1): [...] uint32 each.
    """
    lead, w = keys.shape[:-1], keys.shape[-1]
    n = math.prod(lead)
    keys, k = keys.reshape(n, w), k.reshape(n)
    g = group_rows(n, shards)
    s = -(-n // g)
    # Pad the rows to G x S (padding rows select their 0-th key and are dropped) and view them as
    # [G, S, W]: step j handles rows j, S + j, 2S + j, ... read in place by a dynamic index (a
    # scan over a transposed [S, G, W] copy would move every key once more).
    keys = jnp.pad(keys, ((0, g * s - n), (0, 0)), constant_values=_ALL).reshape(g, s, w)
    k = jnp.pad(k, (0, g * s - n)).reshape(g, s)

    def step(j, found):
        pick = functools.partial(jax.lax.dynamic_index_in_dim, index=j, axis=1, keepdims=False)
        pair = _kth_pair_keys(pick(keys), pick(k), split=shards > 1)  # ([G], [G])
        return tuple(
            jax.lax.dynamic_update_index_in_dim(out, new, j, axis=1)
            for out, new in zip(found, pair, strict=True)
        )

    empty = jnp.zeros((g, s), jnp.uint32)
    key_k, key_k1 = jax.lax.fori_loop(0, s, step, (empty, empty))  # [G, S] each
    return tuple(key.reshape(g * s)[:n].reshape(lead) for key in (key_k, key_k1))


def _kth_pair_member_loop(keys: jax.Array, k: jax.Array, shards: int):
    """`_kth_pair_loop` for the members of a vmapped selection whose mapped axis is split over
    devices: keys [M, *lead, W], k [M, *lead], the rows (lead) split over `shards` devices.

    M stays its own axis: step j takes [M, G, W] and views it as M x G rows, a reshape each
    device does on its own members' rows (the devices split M, then G, as the mesh orders the
    variant axis before the others). Joined into the rows instead, each device would hold
    several separate runs of them, and SPMD would all-gather the keys, or reduce the histograms,
    at every step. The step takes no shortcut (`_kth_pair_keys(split=True)`).
    """
    m, lead, w = keys.shape[0], keys.shape[1:-1], keys.shape[-1]
    n = math.prod(lead)
    keys, k = keys.reshape(m, n, w), k.reshape(m, n)
    g = group_rows(n, shards)
    s = -(-n // g)
    keys = jnp.pad(keys, ((0, 0), (0, g * s - n), (0, 0)), constant_values=_ALL)
    keys = keys.reshape(m, g, s, w)
    k = jnp.pad(k, ((0, 0), (0, g * s - n))).reshape(m, g, s)

    def step(j, found):
        pick = functools.partial(jax.lax.dynamic_index_in_dim, index=j, axis=2, keepdims=False)
        pair = _kth_pair_keys(pick(keys).reshape(m * g, w), pick(k).reshape(m * g), split=True)
        return tuple(
            jax.lax.dynamic_update_index_in_dim(out, new.reshape(m, g), j, axis=2)
            for out, new in zip(found, pair, strict=True)
        )

    empty = jnp.zeros((m, g, s), jnp.uint32)
    key_k, key_k1 = jax.lax.fori_loop(0, s, step, (empty, empty))  # [M, G, S] each
    return tuple(key.reshape(m, g * s)[:, :n].reshape(m, *lead) for key in (key_k, key_k1))


@functools.cache
def _kth_pair_rows(shards: int):
    """`_kth_pair_loop` for rows split over `shards` devices, with its batching rule: under
    `vmap` the mapped axis joins the rows, so the steps' `cond`s stay branches instead of
    becoming selects that run both ways.

    The shard count is fixed here, when the selection is first traced (inside the row blocks'
    `rows_split_over`), because the rule may run later: a vmapped `custom_vjp` batches its
    forward pass's traced program after that pass's Python has returned."""

    @jax.custom_batching.custom_vmap
    def rows(keys, k):
        return _kth_pair_loop(keys, k, shards)

    @rows.def_vmap
    def rule(axis_size, in_batched, keys, k):
        """The mapped axis becomes a leading axis of rows. A plain `vmap` would turn each step's
        `cond`s (the sampled first digit, the skipped last digit) into selects that run both
        branches, and batch the scatters and dynamic slices, so the shortcuts would cost
        instead of save. Both are exact, so the bits are the same."""
        keys, k = (
            a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, batched in zip((keys, k), in_batched, strict=True)
        )
        if _MEMBER_SHARDS.get() > 1:  # the mapped axis is split over devices (a sweep's)
            return _kth_pair_member_loop(keys, k, shards), (True, True)
        # The mapped axis goes after the rows' own axes ([*lead, A, W] keys, [*lead, A] ranks):
        # flattened, each device's rows (its run of the leading axis, for every member) are then
        # one contiguous run, as the loop needs them (`group_rows`). Member-major, each device
        # would hold A separate runs, a layout no tiled sharding of the G axis expresses, and
        # SPMD all-gathers the keys at every step.
        keys, k = jnp.moveaxis(keys, 0, -2), jnp.moveaxis(k, 0, -1)
        key_k, key_k1 = _kth_pair_rows(shards)(keys, k)
        return (jnp.moveaxis(key_k, -1, 0), jnp.moveaxis(key_k1, -1, 0)), (True, True)

    return rows


def kth_smallest_pair_bisect(
    x: jax.Array, k: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`kth_smallest_pair` by 32 bisection passes over all rows at once (the previous method).

    Args:
      x: [..., W] float32 values.
      k: [...] int32 rank, 0 <= k < n_valid.
      valid: [..., W] bool mask of the entries that take part (padding False).

    Returns:
      (x_k, x_k1): [...] float32 each; x_k1 = x_k when k + 1 == n_valid (the last order statistic).
    """
    keys = jnp.where(valid, float_to_key(x), _ALL)  # padding sorts after everything
    k = k.astype(jnp.int32)

    def enough_at_or_below(keys, kk):
        return jnp.sum(keys <= kk[..., None], axis=-1, dtype=jnp.int32) >= k + 1

    key_k = _bisect(keys, valid, enough_at_or_below)
    n_le = jnp.sum(keys <= key_k[..., None], axis=-1, dtype=jnp.int32)
    # The next order statistic is a tie of x_k, or else the smallest valid key above it.
    above = jnp.where(valid & (keys > key_k[..., None]), keys, _ALL)
    next_key = jnp.min(above, axis=-1)
    key_k1 = jnp.where((n_le >= k + 2) | (next_key == _ALL), key_k, next_key)
    return key_to_float(key_k), key_to_float(key_k1)


def kth_smallest_pair_sort(
    x: jax.Array, k: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`kth_smallest_pair` by sorting each row's keys: no loop and no scatter, so no data-dependent
    control flow and nothing that crosses the rows' shards; O(V log V) work per row.

    Args and returns as `kth_smallest_pair` (the same keys, so the same bits, ties included).
    """
    keys = jnp.sort(jnp.where(valid, float_to_key(x), _ALL), axis=-1)  # padding sorts last
    n_valid = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    k = jnp.minimum(jnp.broadcast_to(k.astype(jnp.int32), x.shape[:-1]), n_valid - 1)
    k1 = jnp.minimum(k + 1, n_valid - 1)

    def at(i):
        return jnp.take_along_axis(keys, i[..., None], axis=-1)[..., 0]

    return key_to_float(at(k)), key_to_float(at(k1))


def upper_tail_atom(x: jax.Array, weights: jax.Array, mass: jax.Array) -> jax.Array:
    """Smallest value t among the entries with sum(weights[x > t]) <= mass (the upper VaR atom).

    Args:
      x: [..., V] float32 values.
      weights: [..., V] nonnegative probabilities.
      mass: [...] or scalar tail mass in (0, 1].

    Returns:
      [...] float32: one of the values of x, the (1 - mass) quantile of x under `weights`.
    """
    keys = float_to_key(x)
    valid = jnp.ones(x.shape, bool)
    mass = jnp.asarray(mass, jnp.float32)

    def light_tail_above(keys, kk):
        return jnp.sum(jnp.where(keys > kk[..., None], weights, 0.0), axis=-1) <= mass

    return key_to_float(_bisect(keys, valid, light_tail_above))
