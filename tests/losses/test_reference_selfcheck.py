"""The NumPy references themselves, on cases small enough to work out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsa_jax.testing import reference as ref


def test_quantile_matches_numpy_away_from_integer_ranks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=37)
    for mu in (0.9, 0.95, 0.33):
        assert ref.quantile_linear(x, mu) == pytest.approx(np.quantile(x, 1 - mu), abs=1e-6)


def test_torch_rank_differs_from_numpy_where_the_spec_says():
    assert ref.torch_quantile_rank(16, 0.8) == 3.0
    assert math.floor((1 - 0.8) * 15) == 2  # the float64 rank falls just below 3


def test_hand_computed_risks():
    # V = 4, reference uniform, policy puts its mass differently: d = log(1/4) - logp.
    logq = np.log(np.full(4, 0.25))
    p = np.array([0.1, 0.2, 0.3, 0.4])
    logp = np.log(p)
    d = logq - logp
    kl = float(np.sum(0.25 * d))
    assert ref.risk_term("kl", logp, logq, mu=0.5) == pytest.approx(kl)
    # Textbook CVaR at mu = 0.5: the two largest d (entries 0 and 1), each with mass 0.25.
    assert ref.risk_term("cvar", logp, logq, mu=0.5) == pytest.approx((d[0] + d[1]) / 2)
    # mu = 0.3: entry 0 (mass .25) plus 0.05 of entry 1.
    want = (0.25 * d[0] + 0.05 * d[1]) / 0.3
    assert ref.risk_term("cvar", logp, logq, mu=0.3) == pytest.approx(want)
    assert ref.risk_term("cvar", logp, logq, mu=1.0) == pytest.approx(kl)
    want_erm = math.log(np.sum(0.25 * np.exp(2.0 * d))) / 2.0
    assert ref.risk_term("erm", logp, logq, mu=2.0) == pytest.approx(want_erm)
    assert ref.risk_term("erm", logp, logq, mu=1e-7) == pytest.approx(kl, abs=1e-6)
    # cvar_reference without split, mu = 0.5: rank 0.5 * 3 = 1.5 -> tau between the 2nd and 3rd
    # smallest d (entries 2 and 1), so entries 1 and 0 are kept, each weighted by q = 0.25.
    got = ref.risk_term("cvar_reference", logp, logq, mu=0.5, split_vocab=False)
    assert got == pytest.approx(0.25 * (d[0] + d[1]))
    # Split: halves {0, 1} and {2, 3}; rank 0.5 * 1 = 0.5 in each: keep the larger of each half.
    got = ref.risk_term("cvar_reference", logp, logq, mu=0.5, split_vocab=True)
    assert got == pytest.approx(0.25 * (d[0] + d[2]))


def test_nested_value_and_pair_loss_at_identity():
    rho = np.array([1.0, 2.0, 3.0, 6.0])
    mask = np.array([False, True, False, True])
    np.testing.assert_allclose(ref.nested_value(rho, mask, 0.5), [5.0, 5.0, 6.0, 6.0])
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5))
    labels = rng.integers(0, 5, size=(2, 3))
    mask = np.ones((2, 3), bool)
    for loss in ("dpo", "tdpo", "ra_dpo"):
        losses, metrics = ref.pair_loss(loss, logits, logits, labels, mask)
        np.testing.assert_allclose(losses, [math.log(2.0)])
        assert metrics["rewards/margins"][0] == pytest.approx(0.0)
