"""Exact order statistics over the vocabulary axis without sorting it.

Dimension legend: N positions (any leading shape), V vocabulary, H halves (1 or 2), W half width,
G rows selected together, S = ceil(N / G) steps, R radix digit bins.

The risk terms need, per position, either the k-th smallest of the V values `d_t(v)` (the unweighted
quantile of `cvar_reference`) or the smallest value whose upper tail carries at most a given
probability mass (the weighted quantile of textbook `cvar`). A float32 maps to a uint32 key whose
unsigned order is the float order, so both become searches over keys, exact by construction (the
result is always one of the input values, with ties handled as a sort would):

* `kth_smallest_pair` (the rank is an integer) is a radix select: a few passes each fix the next
  digit of the k-th key (11, 11, then 10 bits), from a histogram of that digit among the keys that
  share the digits fixed so far. The rows go G at a time through a `lax.fori_loop`, so each step's
  G x W keys stay in cache across its passes (the vocabulary axis is far larger than the cache,
  and a pass over all N x V keys at once is bound by memory bandwidth).
* `upper_tail_atom` (the predicate is a float sum of weights) bisects on the key: 32 halvings of
  the key range, each one compare-and-reduce pass over V. Its sums are kept exactly as they are.

Both are O(V) per pass with no data movement, several times faster than an O(V log V) sort on
CPU and accelerators. `kth_smallest_pair_bisect` keeps the 32-pass bisection for the rank search
(the baseline of `bench/loss_head.py` and an independent check in the tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# NumPy scalars, not jnp: a jax array at import time would start the XLA backend, and then
# jax.distributed.initialize (multi-process training) can no longer run.
_SIGN = np.uint32(0x80000000)
_ALL = np.uint32(0xFFFFFFFF)
# 32 halvings exhaust any uint32 range.
_BISECTION_STEPS = 32
# Radix digits of the 32-bit key, most significant first: three histogram passes of at most
# 2048 bins (measured on the 2-core CPU against four 8-bit passes: about the same speed, one pass
# fewer over the keys, and the histograms stay small next to a W = 24576 row).
_DIGITS = (11, 11, 10)
# Rows per loop step: 16 rows of a 49152-entry vocabulary half are 16 x 96 KiB of keys, which
# stay in the caches (1 MiB L2 per core, 32 MiB L3 on the 2-core test machine) across the digit
# passes. It is also what a row block of the risk head hands over (8 positions x 2 vocabulary
# halves, `_row_blocks.BLOCK_ROWS`), so there the selection is one loop step: measured on those
# blocks, 4.8 ns per key against 8.2 ns with 8 rows (two steps). The G axis is the leading one of
# the [G, S, W] layout, so rows sharded over devices stay sharded (each device scans its own
# rows).
_GROUP_ROWS = 16


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
    bins lowers to a reduce-window on XLA's CPU backend, which took 180 us per [16, 2048]
    histogram (a fifth of the risk head's time) against 10 us for this.
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


def _radix_kth_keys(keys: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The k-th smallest key (0-based, with multiplicity) of each row, by radix select.

    Args:
      keys: [G, W] uint32, padding set to the largest key (it sorts last and k never reaches it).
      k: [G] int32, 0 <= k < number of valid keys of the row.

    Returns:
      (key_k, rank_in_tie, ties): [G] uint32 the k-th keys, [G] int32 how many keys equal to each
      come before it in sorted order, and [G] int32 how many keys equal it (the last digit's bin:
      all 32 bits are fixed there). So the (k+1)-th key is a tie of it iff rank_in_tie + 1 < ties.
    """
    g = keys.shape[0]
    prefix = jnp.zeros((g,), jnp.uint32)  # digits fixed so far, in place; the other bits zero
    fixed = np.uint32(0)  # mask of the bits fixed so far
    rank = k  # rank of the answer among the keys that share `prefix`
    ties = jnp.zeros((g,), jnp.int32)  # keys in the chosen bin of the last digit so far
    shift = 32
    for bits in _DIGITS:
        shift -= bits
        bins = 1 << bits
        digit = ((keys >> shift) & np.uint32(bins - 1)).astype(jnp.int32)  # [G, W]
        # A scatter-add histogram (XLA has no histogram primitive): O(W), one pass. The G rows
        # share one flat [G * R] array (row r's bins from r * R), and keys outside the row's
        # current prefix group get an out-of-range index that the scatter drops. Measured on the
        # CPU (8 rows of 24576 keys, in cache): 6.2 ns per key for the whole selection, against
        # 7.0 ns for a scatter vmapped over rows with the outside keys counted in an extra bin
        # (all of them hit that one counter, one after the other).
        index = digit + (jnp.arange(g, dtype=jnp.int32) * bins)[:, None]
        if fixed:
            index = jnp.where((keys & fixed) == prefix[:, None], index, g * bins)
        counts = jnp.zeros((g * bins,), jnp.int32)
        counts = counts.at[index.reshape(-1)].add(1, mode="drop").reshape(g, bins)
        chosen, rank = _bin_holding(counts, rank)
        ties = jnp.take_along_axis(counts, chosen[:, None], axis=-1)[:, 0]
        prefix = prefix | (chosen.astype(jnp.uint32) << np.uint32(shift))
        fixed = np.uint32(fixed | ((bins - 1) << shift))
    # After the last digit the group is the keys equal to key_k, and `rank` is k's place in it.
    return prefix, rank, ties


def _kth_pair_keys(keys: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[G, W] keys, [G] ranks -> the k-th and (k+1)-th smallest keys of each row."""
    key_k, rank_in_tie, ties = _radix_kth_keys(keys, k)
    # The next order statistic is a tie of x_k, or else the smallest key above it (padding keys
    # are the largest key, so none above means k + 1 == n_valid: the last order statistic).
    next_key = jnp.min(jnp.where(keys > key_k[:, None], keys, _ALL), axis=-1)
    key_k1 = jnp.where((rank_in_tie + 1 < ties) | (next_key == _ALL), key_k, next_key)
    return key_k, key_k1


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
    lead, w = x.shape[:-1], x.shape[-1]
    n = math.prod(lead)
    keys = jnp.where(valid, float_to_key(x), _ALL).reshape(n, w)  # padding sorts after everything
    # A rank past the valid entries gives the last one (as the bisection did), never padding.
    n_valid = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    k = jnp.minimum(jnp.broadcast_to(k.astype(jnp.int32), lead), n_valid - 1).reshape(n)
    g = min(_GROUP_ROWS, n)
    s = -(-n // g)
    # Pad the rows to G x S (padding rows select their 0-th key and are dropped) and view them as
    # [G, S, W]: step j handles rows j, S + j, 2S + j, ... read in place by a dynamic index (a
    # scan over a transposed [S, G, W] copy would move every key once more).
    keys = jnp.pad(keys, ((0, g * s - n), (0, 0)), constant_values=_ALL).reshape(g, s, w)
    k = jnp.pad(k, (0, g * s - n)).reshape(g, s)

    def step(j, found):
        pick = functools.partial(jax.lax.dynamic_index_in_dim, index=j, axis=1, keepdims=False)
        pair = _kth_pair_keys(pick(keys), pick(k))  # ([G], [G])
        return tuple(
            jax.lax.dynamic_update_index_in_dim(out, new, j, axis=1)
            for out, new in zip(found, pair, strict=True)
        )

    empty = jnp.zeros((g, s), jnp.uint32)
    key_k, key_k1 = jax.lax.fori_loop(0, s, step, (empty, empty))  # [G, S] each
    key_k, key_k1 = (key.reshape(g * s)[:n].reshape(lead) for key in (key_k, key_k1))
    return key_to_float(key_k), key_to_float(key_k1)


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
