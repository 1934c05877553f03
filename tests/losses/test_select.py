"""Exact selection on float bits (radix select, bisection), against sorting and each other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsa_jax.losses import (
    kth_smallest_pair,
    kth_smallest_pair_bisect,
    kth_smallest_pair_sort,
    upper_tail_atom,
)
from rsa_jax.losses._select import (
    _DIGITS,
    _digit_pass,
    _first_digit_from_sample,
    _leading_digits,
    _pair_from_group,
    _pair_from_last_digit,
    float_to_key,
    key_to_float,
    members_split_over,
    rows_split_over,
)

# The cases of each grid that the default suite runs; `make test-slow` runs every case
# (tests/conftest.py marks the others slow).
DEFAULT_CASES = {
    "test_leading_shapes_and_row_counts_off_the_group_size": ["lead0", "lead4"],
    "test_kth_smallest_matches_sort_with_ties": ["7", "4097"],
}

_kth = jax.jit(kth_smallest_pair)
_atom = jax.jit(upper_tail_atom)


def test_key_order_is_float_order():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-38, 2.0, 7e30, np.inf], np.float32)
    keys = np.asarray(float_to_key(jnp.asarray(x)))
    assert np.all(np.diff(keys.astype(np.int64)) > 0)
    np.testing.assert_array_equal(np.asarray(key_to_float(jnp.asarray(keys))), x)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 4097])
def test_kth_smallest_matches_sort_with_ties(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(6, n)).astype(np.float32)
    x[:3] = np.round(x[:3])  # many exact ties
    x[5] = 1.5  # a constant row
    s = np.sort(x, axis=-1)
    for k in {0, n // 3, n // 2, n - 1}:
        lo, hi = _kth(jnp.asarray(x), jnp.full((6,), k, jnp.int32), jnp.ones(x.shape, bool))
        np.testing.assert_array_equal(np.asarray(lo), s[:, k])
        np.testing.assert_array_equal(np.asarray(hi), s[:, min(k + 1, n - 1)])


def test_kth_smallest_ignores_padding():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 10)).astype(np.float32)
    valid = np.arange(10) < np.array([[3], [10], [1], [7]])
    x_padded = np.where(valid, x, -100.0).astype(np.float32)  # padding would win a min
    for k in range(3):
        lo, hi = _kth(jnp.asarray(x_padded), jnp.full((4,), k), jnp.asarray(valid))
        for row in range(4):
            s = np.sort(x[row, valid[row]])
            kk = min(k, len(s) - 1)
            assert lo[row] == s[kk]
            assert hi[row] == s[min(kk + 1, len(s) - 1)]


def test_upper_tail_atom_matches_brute_force():
    rng = np.random.default_rng(2)
    for v in (5, 33, 500):
        d = np.round(rng.normal(size=(8, v)), 1).astype(np.float32)  # ties
        q = rng.dirichlet(np.ones(v), size=8).astype(np.float32)
        for mass in (0.05, 0.3, 0.97, 1.0):
            got = np.asarray(_atom(jnp.asarray(d), jnp.asarray(q), jnp.float32(mass)))
            for row in range(8):
                cands = [t for t in np.unique(d[row]) if q[row][d[row] > t].sum() <= mass]
                assert got[row] == min(cands)


_kth_bisect = jax.jit(kth_smallest_pair_bisect)
_kth_sort = jax.jit(kth_smallest_pair_sort)


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def _check_all_ranks(x, valid=None):
    """Radix select == the bisection == the key sort (bit for bit) == a sort (by value) at every
    rank."""
    valid = np.ones(x.shape, bool) if valid is None else valid
    n = x.shape[-1]
    for k in range(n):
        kk = jnp.full(x.shape[:-1], k, jnp.int32)
        lo, hi = _kth(jnp.asarray(x), kk, jnp.asarray(valid))
        lo_b, hi_b = _kth_bisect(jnp.asarray(x), kk, jnp.asarray(valid))
        np.testing.assert_array_equal(_bits(lo), _bits(lo_b))
        np.testing.assert_array_equal(_bits(hi), _bits(hi_b))
        lo_s, hi_s = _kth_sort(jnp.asarray(x), kk, jnp.asarray(valid))
        np.testing.assert_array_equal(_bits(lo), _bits(lo_s))
        np.testing.assert_array_equal(_bits(hi), _bits(hi_s))
        s = np.sort(np.where(valid, x, np.inf), axis=-1)
        n_valid = valid.sum(-1)
        np.testing.assert_array_equal(
            np.asarray(lo), np.take_along_axis(s, np.minimum(k, n_valid - 1)[..., None], -1)[..., 0]
        )
        np.testing.assert_array_equal(
            np.asarray(hi),
            np.take_along_axis(s, np.minimum(k + 1, n_valid - 1)[..., None], -1)[..., 0],
        )


def test_infinities_signed_zeros_and_ties_at_every_rank():
    special = np.array([np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, 1.0])
    rng = np.random.default_rng(7)
    rows = np.stack([rng.permutation(special) for _ in range(5)]).astype(np.float32)
    rows[1] = np.inf  # all +inf
    rows[2, :6] = -np.inf  # many -inf ties
    rows[3] = np.where(np.arange(10) % 2, 0.0, -0.0)  # only zeros of both signs
    _check_all_ranks(rows)


def test_negative_zero_sorts_just_below_positive_zero():
    x = jnp.asarray([[0.0, -0.0, 0.0, -0.0]], jnp.float32)
    lo, hi = _kth(x, jnp.array([1]), jnp.ones(x.shape, bool))
    assert np.signbit(np.asarray(lo))[0] and not np.signbit(np.asarray(hi))[0]


def test_bfloat16_inputs_widen_exactly():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(3, 40)), jnp.bfloat16)
    wide = np.asarray(x.astype(jnp.float32))
    _check_all_ranks(wide)
    lo, hi = _kth(x, jnp.full((3,), 17), jnp.ones(x.shape, bool))
    np.testing.assert_array_equal(np.asarray(lo), np.sort(wide, -1)[:, 17])
    np.testing.assert_array_equal(np.asarray(hi), np.sort(wide, -1)[:, 18])


@pytest.mark.parametrize("lead", [(1,), (3,), (9,), (2, 5, 2), (17,)])
def test_leading_shapes_and_row_counts_off_the_group_size(lead):
    # Row counts below, at and past the 8-row group, not multiples of it, and a 3-d lead.
    rng = np.random.default_rng(len(lead) * 10 + lead[0])
    w = 50
    x = np.round(rng.normal(size=(*lead, w)), 1).astype(np.float32)
    valid = rng.random(size=(*lead, w)) < 0.8
    valid[..., 0] = True
    k = rng.integers(0, w, size=lead).astype(np.int32)
    lo, hi = _kth(jnp.asarray(x), jnp.asarray(k), jnp.asarray(valid))
    lo_b, hi_b = _kth_bisect(jnp.asarray(x), jnp.asarray(k), jnp.asarray(valid))
    assert lo.shape == hi.shape == lead
    np.testing.assert_array_equal(_bits(lo), _bits(lo_b))
    np.testing.assert_array_equal(_bits(hi), _bits(hi_b))
    lo_s, hi_s = _kth_sort(jnp.asarray(x), jnp.asarray(k), jnp.asarray(valid))
    np.testing.assert_array_equal(_bits(lo), _bits(lo_s))
    np.testing.assert_array_equal(_bits(hi), _bits(hi_s))


def test_wide_rows_with_many_ties_match_the_bisection():
    # A vocabulary-sized row (every digit pass has work) with heavy ties around the rank.
    rng = np.random.default_rng(9)
    x = np.round(rng.normal(size=(4, 24576)) * 4) / 4
    x[2] = np.where(rng.random(24576) < 0.5, -0.0, 0.0)
    x = x.astype(np.float32)
    for k in (0, 1228, 12287, 24575):
        kk = jnp.full((4,), k, jnp.int32)
        got = _kth(jnp.asarray(x), kk, jnp.ones(x.shape, bool))
        want = _kth_bisect(jnp.asarray(x), kk, jnp.ones(x.shape, bool))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(b))
        s = np.sort(x, -1)
        np.testing.assert_array_equal(np.asarray(got[0]), s[:, k])


def _cluster_rows(rng, spec, w=64):
    """Rows of spread values, each with a cluster of keys within one ulp-group of 1.0 (the keys
    0x3F800000 + offset, offset < 1024, share their top 22 bits: one group of the radix select
    after its leading digits). spec: one (offsets, r) per row; k puts x_k at place r of the
    sorted cluster. Returns (x [R, w] float32, k [R] int32)."""
    rows, ks = [], []
    for offsets, r in spec:
        spread = rng.normal(size=w - len(offsets)).astype(np.float32) * 4
        spread = np.where(np.abs(spread - 1) < 0.01, spread + 0.5, spread).astype(np.float32)
        cluster = (np.uint32(0x3F800000) + np.asarray(offsets, np.uint32)).view(np.float32)
        rows.append(rng.permutation(np.concatenate([spread, cluster])))
        ks.append(int(np.sum(spread < 1.0)) + r)
    return np.stack(rows).astype(np.float32), np.asarray(ks, np.int32)


# (offsets of the cluster, place r of x_k in it), and whether one fused pass over the group gives
# x_k and x_(k+1): always for c <= 3 keys or all-equal keys, else only at the last place (x_(k+1)
# is then the smallest key above the group).
_CLUSTERS = [
    (([5], 0), True),
    (([9, 2], 0), True),
    (([9, 2], 1), True),
    (([7, 3, 700], 1), True),
    (([7, 7, 3], 0), True),
    (([4, 4, 4, 4, 4], 2), True),
    (([1, 2, 3, 1023], 3), True),
    (([1, 2, 3, 1023], 0), False),
    (([1, 2, 3, 1023], 1), False),
    (([0, 0, 0, 1], 1), False),
    (([0, 0, 0, 1], 2), False),
    (([8, 6, 6, 6, 9, 1], 5), True),
    (([8, 6, 6, 6, 9, 1], 4), False),
    (([10, 11, 12, 13, 14, 15], 0), False),
    (([0, 1, 2, 3], 3), True),
    (([3, 3], 1), True),
]


def test_one_fused_pass_reads_the_pair_off_small_or_tied_groups():
    rng = np.random.default_rng(11)
    x, k = _cluster_rows(rng, [spec for spec, _ in _CLUSTERS])
    keys = float_to_key(jnp.asarray(x))
    group = _leading_digits(keys, jnp.asarray(k))
    key_k, key_k1, known, _ = jax.jit(_pair_from_group)(keys, group)
    s = np.sort(x, axis=-1)
    rows = np.arange(len(k))
    np.testing.assert_array_equal(np.asarray(group.count), [len(o) for (o, _), _ in _CLUSTERS])
    np.testing.assert_array_equal(np.asarray(known), [ok for _, ok in _CLUSTERS])
    got = np.asarray(key_to_float(key_k)), np.asarray(key_to_float(key_k1))
    for value, rank in zip(got, (k, k + 1), strict=True):
        np.testing.assert_array_equal(_bits(value)[known], _bits(s[rows, rank])[known])


def test_the_last_digit_pass_gives_the_pair_of_every_row():
    rng = np.random.default_rng(12)
    x, k = _cluster_rows(rng, [spec for spec, _ in _CLUSTERS])
    keys = float_to_key(jnp.asarray(x))
    group = _leading_digits(keys, jnp.asarray(k))
    _, _, _, above = _pair_from_group(keys, group)
    key_k, key_k1 = jax.jit(_pair_from_last_digit)(keys, group, above)
    s = np.sort(x, axis=-1)
    rows = np.arange(len(k))
    np.testing.assert_array_equal(_bits(key_to_float(key_k)), _bits(s[rows, k]))
    np.testing.assert_array_equal(_bits(key_to_float(key_k1)), _bits(s[rows, k + 1]))


def test_steps_with_and_without_the_last_digit_pass_in_one_group():
    # 16 rows (one loop step): at some ranks every row's group is small (the fused pass decides
    # the step), at others one row's x_k sits inside a larger cluster (the last digit pass runs).
    rng = np.random.default_rng(13)
    x, _ = _cluster_rows(rng, [spec for spec, _ in _CLUSTERS])
    keys = float_to_key(jnp.asarray(x))
    pair_known = jax.jit(lambda keys, k: _pair_from_group(keys, _leading_digits(keys, k))[2])
    steps = [bool(np.all(pair_known(keys, jnp.full((16,), k)))) for k in range(x.shape[1])]
    assert any(steps) and not all(steps)
    _check_all_ranks(x)


def test_signed_zeros_and_subnormals_share_groups_at_the_cut():
    # +0 shares its group with the smallest positive subnormals (keys 0x80000000 + n), -0 with
    # the negative ones; the two groups are adjacent, so x_(k+1) crosses from one to the other.
    tiny = np.float32(1e-45)
    rows = np.array(
        [
            [-0.0, 0.0, 1.0, -1.0, 2.0, 3.0, -2.0, 5.0],
            [-0.0, -0.0, -0.0, 0.0, 0.0, 1.0, 2.0, -1.0],
            [-0.0, 0.0, tiny, 2 * tiny, 0.0, -tiny, -0.0, 1.0],
            [0.0, tiny, tiny, 3 * tiny, -0.0, -tiny, -3 * tiny, -0.0],
            [-0.0] * 4 + [0.0] * 4,
        ],
        np.float32,
    )
    _check_all_ranks(rows)


def test_vmapped_selection_equals_the_plain_one_bit_for_bit():
    # Under vmap the members' rows join one loop (the batching rule of `_kth_pair_rows`): same
    # bits as the plain program, for a member whose steps all skip the last digit and one whose
    # steps need it, with the mapped axis on any argument and vmaps nested.
    rng = np.random.default_rng(14)
    fast = [([3], 0)] * 16
    slow = [spec for spec, _ in _CLUSTERS]
    members = [_cluster_rows(rng, specs) for specs in (fast, slow)]
    x, k = (jnp.asarray(np.stack(parts)) for parts in zip(*members, strict=True))
    valid = jnp.ones(x.shape, bool)
    plain = [_kth(x[m], k[m], valid[m]) for m in range(2)]
    batched = jax.jit(jax.vmap(kth_smallest_pair))(x, k, valid)
    nested = jax.jit(jax.vmap(jax.vmap(kth_smallest_pair)))(x, k, valid)
    for member in range(2):
        for a, b, c in zip(batched, nested, plain[member], strict=True):
            np.testing.assert_array_equal(_bits(a[member]), _bits(c))
            np.testing.assert_array_equal(_bits(b[member]), _bits(c))
    # One set of rows, a batch of ranks: the rows are shared by the members.
    ranks = jax.jit(jax.vmap(kth_smallest_pair, in_axes=(None, 0, None)))(x[1], k, valid[1])
    for member in range(2):
        want = _kth(x[1], k[member], valid[1])
        for a, b in zip(ranks, want, strict=True):
            np.testing.assert_array_equal(_bits(a[member]), _bits(b))


def test_the_selection_passes_no_gradient_and_does_not_block_one():
    # The order statistics are picked, not computed: zero derivative (as the bisection's), and
    # a loss that uses them next to differentiable terms differentiates, plain and vmapped.
    x = jnp.asarray(np.random.default_rng(17).normal(size=(3, 40)), jnp.float32)
    k = jnp.asarray([0, 7, 39], jnp.int32)
    valid = jnp.ones(x.shape, bool)

    def loss(x, k):
        lo, hi = kth_smallest_pair(x, k, valid[0])
        return jnp.sum(lo + hi) + jnp.sum(x**2)

    np.testing.assert_array_equal(jax.grad(lambda x: loss(x, k[0]))(x), 2 * x)
    np.testing.assert_array_equal(jax.vmap(jax.grad(loss))(x, k), 2 * x)


def _first_pass(keys, k):
    """The first digit's bin and rank by a full histogram pass (what the sample's guess saves)."""
    prefix, _, rank, _, _ = _digit_pass(
        keys, jnp.zeros(k.shape, jnp.uint32), np.uint32(0), k, 32 - _DIGITS[0], _DIGITS[0]
    )
    return prefix, rank


def test_the_sampled_first_digit_is_checked_against_all_keys():
    # Rows where every 16th entry (the sample) is typical of the row, and rows where it is not:
    # there the sample's bin is far from x_k's, and the guess must say so, never answer wrongly.
    rng = np.random.default_rng(15)
    w = 4096
    x = rng.normal(size=(8, w)).astype(np.float32)
    x[4:, ::16] = 1e30  # the sample sees only huge values; x_k is an ordinary one
    k = jnp.asarray(rng.integers(0, w - w // 16, size=8), jnp.int32)
    keys = float_to_key(jnp.asarray(x))
    prefix, rank, found = jax.jit(_first_digit_from_sample)(keys, k)
    want_prefix, want_rank = _first_pass(keys, k)
    np.testing.assert_array_equal(np.asarray(found), [True] * 4 + [False] * 4)
    np.testing.assert_array_equal(np.asarray(prefix)[:4], np.asarray(want_prefix)[:4])
    np.testing.assert_array_equal(np.asarray(rank)[:4], np.asarray(want_rank)[:4])


def test_bins_looked_at_past_the_key_range_count_every_key():
    # Padding keys (the largest key) sit in the last bin of the first digit: where the sample
    # sees mostly padding, the bins around its guess run past the key range.
    padding = np.uint32(0xFFFFFFFF)
    inf = np.asarray(float_to_key(jnp.float32(np.inf)))
    keys = np.full((2, 128), padding, np.uint32)
    keys[0, :8] = inf  # the sample's first key is +inf: its bin, found
    keys[1, 1:16] = inf  # the sample is all padding: x_2 = +inf is not in the bins looked at
    k = jnp.asarray([7, 2], jnp.int32)
    prefix, rank, found = jax.jit(_first_digit_from_sample)(jnp.asarray(keys), k)
    want_prefix, want_rank = _first_pass(jnp.asarray(keys), k)
    np.testing.assert_array_equal(np.asarray(found), [True, False])
    assert prefix[0] == want_prefix[0] and rank[0] == want_rank[0] == 7


def test_steps_with_a_misleading_sample_in_some_rows_match_the_bisection():
    # One 16-row step where the sample's guess finds every row's bin and ranks where it does
    # not for some rows (the full first pass runs): same bits as the bisection at those ranks.
    rng = np.random.default_rng(16)
    w = 1024
    x = (0.1 * rng.normal(size=(16, w))).astype(np.float32)
    x[::3, ::16] = -50.0  # these rows' samples put x_k far below where it is for k > w / 16
    for k in (0, 10, 63, 64, 300, 700, w - 1):
        kk = jnp.full((16,), k, jnp.int32)
        valid = jnp.ones(x.shape, bool)
        got = _kth(jnp.asarray(x), kk, valid)
        want = _kth_bisect(jnp.asarray(x), kk, valid)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(b))
    keys = float_to_key(jnp.asarray(x))
    found = [np.asarray(_first_digit_from_sample(keys, jnp.full((16,), k))[2]) for k in (10, 300)]
    assert np.all(found[0]) and not np.all(found[1])


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_rows_split_over_devices_take_no_shortcut_and_give_the_same_bits(shards):
    # With the rows split over devices (`rows_split_over`, the risk head on a mesh) the loop
    # runs per-row histograms and no `cond` (a predicate over rows on several devices is a
    # collective at every step): the same bits as the sort, in rows where the fused pass or the
    # sampled first digit would have failed and where they would have held, plain and vmapped
    # (shards=1: the shortcuts, for comparison).
    rng = np.random.default_rng(17)
    x, k = _cluster_rows(rng, [spec for spec, _ in _CLUSTERS])
    x = np.concatenate([x, x[:, ::-1]])  # 32 rows: G = 16 x shards takes them in one step
    x[::5, ::16] = -50.0  # misleading samples
    k = np.concatenate([k, x.shape[1] - 1 - k])
    valid = jnp.ones(x.shape, bool)

    def split(x, k, valid):
        with rows_split_over(shards):
            return kth_smallest_pair(x, k, valid)

    got = jax.jit(split)(jnp.asarray(x), jnp.asarray(k), valid)
    want = _kth_sort(jnp.asarray(x), jnp.asarray(k), valid)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    batched = jax.jit(jax.vmap(split))(*(jnp.stack([a, a[::-1]]) for a in (x, k, valid)))
    for a, b in zip(batched, want, strict=True):
        np.testing.assert_array_equal(_bits(a[0]), _bits(b))
        np.testing.assert_array_equal(_bits(a[1]), _bits(b[::-1]))

    # A sweep's variants split over devices (`members_split_over`): the mapped axis stays the
    # loop's own axis, the same bits.
    def members(x, k, valid):
        with members_split_over(2):
            return jax.vmap(split)(x, k, valid)

    stacked = jax.jit(members)(*(jnp.stack([a, a[::-1]]) for a in (x, k, valid)))
    for a, b in zip(stacked, batched, strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    hlo = jax.jit(split).lower(jnp.asarray(x), jnp.asarray(k), valid).as_text()
    branches = "stablehlo.case" in hlo or "stablehlo.if" in hlo
    assert branches == (shards == 1)  # shortcuts only where the rows are on one device
