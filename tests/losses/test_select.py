"""Exact selection by bisection on float bits, against sorting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsa_jax.losses import kth_smallest_pair, upper_tail_atom
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
