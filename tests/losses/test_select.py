"""Exact selection on float bits (radix select, bisection), against sorting and each other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsa_jax.losses import kth_smallest_pair, kth_smallest_pair_bisect, upper_tail_atom
from rsa_jax.losses._select import float_to_key, key_to_float

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


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def _check_all_ranks(x, valid=None):
    """Radix select == the bisection (bit for bit) == a sort (by value) at every rank."""
    valid = np.ones(x.shape, bool) if valid is None else valid
    n = x.shape[-1]
    for k in range(n):
        kk = jnp.full(x.shape[:-1], k, jnp.int32)
        lo, hi = _kth(jnp.asarray(x), kk, jnp.asarray(valid))
        lo_b, hi_b = _kth_bisect(jnp.asarray(x), kk, jnp.asarray(valid))
        np.testing.assert_array_equal(_bits(lo), _bits(lo_b))
        np.testing.assert_array_equal(_bits(hi), _bits(hi_b))
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
