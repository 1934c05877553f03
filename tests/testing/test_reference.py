"""Self-checks of the NumPy references (rsa_jax.testing.reference) on hand-computed tiny cases.

Expected values are written out from docs/method.md sections 4-6 with `math`, not with the
reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsa_jax.testing import reference as ref

LN = math.log

# One position, V = 4: q = [.1, .2, .3, .4], p = [.4, .3, .2, .1], so d = log(q / p) is
# [ln 1/4, ln 2/3, ln 3/2, ln 4], increasing with the index.
Q4 = [0.1, 0.2, 0.3, 0.4]
P4 = [0.4, 0.3, 0.2, 0.1]
D4 = [LN(0.25), LN(2 / 3), LN(1.5), LN(4.0)]
KL4 = 0.1 * LN(0.25) + 0.2 * LN(2 / 3) + 0.3 * LN(1.5) + 0.4 * LN(4.0)


def _logs(probs):
    return np.log(np.array(probs, dtype=np.float64))


# --------------------------------------------------------------------------- log_softmax


def test_log_softmax_hand_values_shape_and_stability():
    x = np.array([0.0, LN(2.0), LN(3.0)])
    np.testing.assert_allclose(ref.log_softmax(x), [LN(1 / 6), LN(2 / 6), LN(3 / 6)], rtol=1e-14)
    big = np.array([[1000.0, 1000.0], [-1000.0, -1000.0]], dtype=np.float32)
    out = ref.log_softmax(big)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, np.full((2, 2), LN(0.5)), rtol=1e-14)
    cube = np.random.default_rng(0).normal(size=(2, 3, 5))
    out = ref.log_softmax(cube)
    assert out.shape == (2, 3, 5)
    np.testing.assert_allclose(np.exp(out).sum(-1), np.ones((2, 3)), rtol=1e-13)


# --------------------------------------------------------------------------- quantile


def test_torch_rank_at_the_documented_divergence():
    assert ref.torch_quantile_rank(16, 0.8) == 3.0
    # numpy's float64 rank falls just below 3 (2.999999999999999; docs/method.md quotes ...96).
    numpy_rank = (1 - 0.8) * 15
    assert numpy_rank < 3.0 and math.floor(numpy_rank) == 2
    assert np.quantile(np.arange(16.0), 1 - 0.8, method="linear") == numpy_rank
    assert ref.torch_quantile_rank(101, 0.95) == 5.0
    assert ref.torch_quantile_rank(1, 0.3) == 0.0
    assert ref.torch_quantile_rank(5, 0.0) == 4.0
    assert ref.torch_quantile_rank(5, 1.0) == 0.0


def test_quantile_follows_torch_where_numpy_differs():
    x = np.arange(16, dtype=np.float64) * 1.5 - 3.0  # sorted, distinct
    # torch's rank is exactly 3: the 4th smallest value, no interpolation.
    assert ref.quantile_linear(x, 0.8) == x[3]
    # numpy interpolates just below it.
    assert np.quantile(x, 1 - 0.8, method="linear") < x[3]


@pytest.mark.parametrize("n", [2, 7, 10, 33, 256])
@pytest.mark.parametrize("mu", [0.95, 0.9, 0.5, 0.37, 0.01])
def test_quantile_matches_numpy_linear_for_generic_mu(n, mu):
    x = np.random.default_rng(n).normal(size=n)
    want = np.quantile(x, 1 - mu, method="linear")
    # The float32 rank moves the result by at most ~1e-7 of a gap between neighbours.
    assert ref.quantile_linear(x, mu) == pytest.approx(want, abs=1e-6)


def test_quantile_hand_cases():
    x = np.array([4.0, 1.0, 3.0, 2.0])
    assert ref.quantile_linear(x, 0.5) == 2.5  # r = 1.5 between 2 and 3
    assert ref.quantile_linear(x, 1.0) == 1.0  # r = 0: the minimum
    assert ref.quantile_linear(x, 0.0) == 4.0  # r = n - 1: the maximum
    assert ref.quantile_linear(np.array([7.0]), 0.95) == 7.0
    assert ref.quantile_linear(np.array([2.0, 2.0, 2.0, 5.0]), 0.5) == 2.0  # ties
    # r = float32(0.05) * 3 = 0.15000000223517418: 1 + r * (2 - 1).
    assert ref.quantile_linear(x, 0.95) == pytest.approx(1.0 + 0.15, abs=1e-7)
    with pytest.raises(ValueError):
        ref.quantile_linear(x, 1.5)


# --------------------------------------------------------------------------- risk terms


def test_kl_hand_value():
    got = ref.risk_term("kl", _logs(P4), _logs(Q4), mu=0.95)
    assert got == pytest.approx(KL4, rel=1e-13)
    assert got > 0.0


def test_cvar_reference_without_split():
    logp, logq = _logs(P4), _logs(Q4)
    # mu = 0.5: r = 1.5, tau = (ln 2/3 + ln 3/2) / 2 = 0; keep d > 0: entries 2 and 3.
    got = ref.risk_term("cvar_reference", logp, logq, mu=0.5, split_vocab=False)
    assert got == pytest.approx(0.3 * D4[2] + 0.4 * D4[3], rel=1e-12)
    # mu = 0.95: r = 0.15, tau just above the minimum; keep entries 1, 2, 3 (no 1/mu).
    got = ref.risk_term("cvar_reference", logp, logq, mu=0.95, split_vocab=False)
    assert got == pytest.approx(0.2 * D4[1] + 0.3 * D4[2] + 0.4 * D4[3], rel=1e-12)
    # mu = 1: tau = the minimum itself; the strict mask drops only entry 0.
    got = ref.risk_term("cvar_reference", logp, logq, mu=1.0, split_vocab=False)
    assert got == pytest.approx(0.2 * D4[1] + 0.3 * D4[2] + 0.4 * D4[3], rel=1e-12)
    # mu = 0: tau = the maximum; nothing is strictly above it.
    assert ref.risk_term("cvar_reference", logp, logq, mu=0.0, split_vocab=False) == 0.0


def test_cvar_reference_split_halves():
    logp, logq = _logs(P4), _logs(Q4)
    # Halves {0, 1} and {2, 3}, each with its own threshold between its two values: the larger
    # entry of each half is kept, including the negative d of entry 1.
    want = 0.2 * D4[1] + 0.4 * D4[3]
    for mu in (0.5, 0.95):
        got = ref.risk_term("cvar_reference", logp, logq, mu=mu, split_vocab=True)
        assert got == pytest.approx(want, rel=1e-12)


def test_cvar_reference_ties_are_strict_and_tiny_vocabularies():
    # V = 3: q = [.5, .25, .25], p = [.25, .5, .25] -> d = [ln 2, ln 1/2, 0] (d[2] exactly 0).
    logq, logp = _logs([0.5, 0.25, 0.25]), _logs([0.25, 0.5, 0.25])
    # No split, mu = 0.5: r = 1, tau = the middle value 0 exactly; entry 2 (d = tau) is dropped.
    got = ref.risk_term("cvar_reference", logp, logq, mu=0.5, split_vocab=False)
    assert got == pytest.approx(0.5 * LN(2.0), rel=1e-13)
    # Split: half {0} has size 1 (tau = its value, mask empty); half {1, 2} keeps entry 2, d = 0.
    assert ref.risk_term("cvar_reference", logp, logq, mu=0.5, split_vocab=True) == 0.0
    # V = 1: the first half is empty, the second has size 1: rho = 0, no error.
    one = np.array([0.0])
    assert ref.risk_term("cvar_reference", one, one, mu=0.95, split_vocab=True) == 0.0
    # Identical distributions: every d is 0, nothing is strictly above the threshold.
    same = _logs(Q4)
    for split in (True, False):
        assert ref.risk_term("cvar_reference", same, same, mu=0.7, split_vocab=split) == 0.0


def test_cvar_reference_torch_rank_keeps_one_entry_fewer():
    # V = 16, no split, mu = 0.8: torch's rank 3.0 puts tau on the 4th smallest d exactly, so
    # the strict mask keeps the 12 largest (numpy's rank would keep 13).
    logq = np.full(16, LN(1 / 16))
    logp = ref.log_softmax(np.linspace(-2.0, 1.0, 16) ** 3)
    d = sorted(LN(1 / 16) - float(v) for v in logp)
    want = sum(d[4:]) / 16
    got = ref.risk_term("cvar_reference", logp, logq, mu=0.8, split_vocab=False)
    assert got == pytest.approx(want, rel=1e-12)
    assert abs(got - (want + d[3] / 16)) > 1e-3


def test_textbook_cvar_hand_values():
    logp, logq = _logs(P4), _logs(Q4)
    # Upper tail by decreasing d: entry 3 (mass .4), entry 2 (.3), entry 1 (.2), entry 0 (.1).
    cases = {
        0.4: D4[3],
        0.5: (0.4 * D4[3] + 0.1 * D4[2]) / 0.5,
        0.75: (0.4 * D4[3] + 0.3 * D4[2] + 0.05 * D4[1]) / 0.75,
        0.1: D4[3],
    }
    for mu, want in cases.items():
        assert ref.risk_term("cvar", logp, logq, mu=mu) == pytest.approx(want, rel=1e-12)
    # mu = 1 is the whole distribution: the KL.
    assert ref.risk_term("cvar", logp, logq, mu=1.0) == pytest.approx(KL4, rel=1e-12)
    # CVaR decreases as the tail widens.
    values = [ref.risk_term("cvar", logp, logq, mu=mu) for mu in (0.1, 0.3, 0.6, 1.0)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError):
        ref.risk_term("cvar", logp, logq, mu=0.0)


def test_cvar_at_mu_one_is_kl_on_random_rows():
    rng = np.random.default_rng(3)
    for _ in range(5):
        logp = ref.log_softmax(2.0 * rng.normal(size=11))
        logq = ref.log_softmax(2.0 * rng.normal(size=11))
        kl = ref.risk_term("kl", logp, logq, mu=1.0)
        assert ref.risk_term("cvar", logp, logq, mu=1.0) == pytest.approx(kl, rel=1e-12)


def test_erm_hand_values_and_limits():
    logp, logq = _logs(P4), _logs(Q4)
    # mu = 1: log sum_v q exp(d) = log sum_v q^2 / p.
    want = LN(0.01 / 0.4 + 0.04 / 0.3 + 0.09 / 0.2 + 0.16 / 0.1)
    assert ref.risk_term("erm", logp, logq, mu=1.0) == pytest.approx(want, rel=1e-13)
    # mu = 2: (1/2) log sum_v q (q / p)^2.
    want = 0.5 * LN(sum(q * (q / p) ** 2 for q, p in zip(Q4, P4, strict=True)))
    assert ref.risk_term("erm", logp, logq, mu=2.0) == pytest.approx(want, rel=1e-13)
    # mu -> 0: the KL.
    assert ref.risk_term("erm", logp, logq, mu=1e-6) == pytest.approx(KL4, abs=1e-5)
    # Large mu: finite, between max d + log(q_max)/mu and max d (no overflow).
    big = ref.risk_term("erm", logp, logq, mu=1e4)
    assert D4[3] + LN(0.4) / 1e4 - 1e-12 <= big <= D4[3] + 1e-12
    with pytest.raises(ValueError):
        ref.risk_term("erm", logp, logq, mu=0.0)


def test_unknown_risk_and_bad_shapes():
    with pytest.raises(ValueError):
        ref.risk_term("var", _logs(P4), _logs(Q4), mu=0.5)
    with pytest.raises(ValueError):
        ref.risk_term("kl", _logs(P4), _logs(Q4[:3]), mu=0.5)


# --------------------------------------------------------------------------- sequences


def test_token_stats_hand_values():
    # N = 1, T = 2, V = 3. Position 0: policy [0, ln 2, ln 3] (p = 1/6, 2/6, 3/6), reference
    # uniform; label 2. Position 1: identical logits; label 0.
    policy = np.array([[[0.0, LN(2.0), LN(3.0)], [1.0, 2.0, 3.0]]])
    refl = np.array([[[5.0, 5.0, 5.0], [1.0, 2.0, 3.0]]])
    labels = np.array([[2, 0]])
    stats = ref.token_stats(policy, refl, labels, risk="kl", mu=0.5)
    assert set(stats) >= {"g", "kl", "rho"}
    assert stats["g"].shape == (1, 2)
    assert stats["g"][0, 0] == pytest.approx(LN(0.5) - LN(1 / 3), rel=1e-13)
    kl0 = sum((1 / 3) * (LN(1 / 3) - LN(k / 6)) for k in (1, 2, 3))
    assert stats["kl"][0, 0] == pytest.approx(kl0, rel=1e-13)
    assert stats["rho"][0, 0] == pytest.approx(kl0, rel=1e-13)  # risk="kl"
    assert stats["logp"][0, 0] == pytest.approx(LN(0.5), rel=1e-13)
    assert stats["g"][0, 1] == 0.0
    assert stats["kl"][0, 1] == 0.0
    # Same inputs, cvar_reference without split at mu = 0.5: d = ln(1/3) - ln(k/6) =
    # [ln 2, ln 1, ln 2/3]: r = 1, tau = 0; only entry 0 is kept: (1/3) ln 2.
    stats = ref.token_stats(policy, refl, labels, risk="cvar_reference", mu=0.5, split_vocab=False)
    assert stats["rho"][0, 0] == pytest.approx(LN(2.0) / 3, rel=1e-12)
    with pytest.raises(ValueError):
        ref.token_stats(policy, refl, np.array([[3, 0]]))


def test_nested_value_hand_case_and_gamma_one_sum():
    rho = np.array([1.0, 2.0, 3.0, 6.0])
    mask = np.array([False, True, False, True])
    # V_5 = 0, V_4 = 6, V_3 = 6 (masked), V_2 = 2 + 0.5 * 6 = 5, V_1 = 5 (masked).
    np.testing.assert_array_equal(ref.nested_value(rho, mask, 0.5), [5.0, 5.0, 6.0, 6.0])
    # gamma = 1: S = V_1 is the masked sum, per row of an [N, T] input.
    rng = np.random.default_rng(7)
    rho2 = rng.normal(size=(4, 9))
    mask2 = rng.random(size=(4, 9)) < 0.6
    mask2[1] = False  # a fully padded row: S = 0
    values = ref.nested_value(rho2, mask2, 1.0)
    assert values.shape == (4, 9)
    for n in range(4):
        assert values[n, 0] == pytest.approx(sum(rho2[n][mask2[n]]), abs=1e-12)
    assert values[1, 0] == 0.0
    # A masked-out step ignores whatever rho holds there.
    assert ref.nested_value(np.array([np.nan, 1.0]), np.array([False, True]), 0.9)[0] == 1.0


def test_sequence_sums_hand_case():
    stats = {
        "g": np.array([[1.0, 2.0, 4.0]]),
        "kl": np.array([[0.5, 0.25, 8.0]]),
        "rho": np.array([[1.0, 3.0, 100.0]]),
    }
    mask = np.array([[True, True, False]])
    sums = ref.sequence_sums(stats, mask, 0.5)
    assert sums["M"][0] == 3.0
    assert sums["K"][0] == 0.75
    assert sums["S"][0] == 1.0 + 0.5 * 3.0


# --------------------------------------------------------------------------- pair loss

# One pair, T = 1, V = 2, label 0 on both sides.
# Chosen: p = [3/4, 1/4], q = [1/2, 1/2]: g_w = ln 3/2, d_w = [ln 2/3, ln 2],
#   KL_w = (ln 2/3 + ln 2) / 2.
# Rejected: p = [1/2, 1/2], q = [3/4, 1/4]: g_l = ln 2/3, d_l = [ln 3/2, ln 1/2],
#   KL_l = 3/4 ln 3/2 + 1/4 ln 1/2.
PAIR_POLICY = np.array([[[LN(3.0), 0.0]], [[0.0, 0.0]]])
PAIR_REF = np.array([[[0.0, 0.0]], [[LN(3.0), 0.0]]])
PAIR_LABELS = np.array([[0], [0]])
PAIR_MASK = np.array([[True], [True]])
G_W, G_L = LN(1.5), LN(2 / 3)
KL_W = 0.5 * LN(2 / 3) + 0.5 * LN(2.0)
KL_L = 0.75 * LN(1.5) + 0.25 * LN(0.5)
# cvar_reference without split, mu = 0.95: r = 0.05, the larger d of each row is kept.
RHO_W, RHO_L = 0.5 * LN(2.0), 0.75 * LN(1.5)


def _nll_sigmoid(z):
    return LN(1.0 + math.exp(-z))


def _pair(loss, **kwargs):
    return ref.pair_loss(loss, PAIR_POLICY, PAIR_REF, PAIR_LABELS, PAIR_MASK, **kwargs)


def test_pair_loss_hand_values():
    beta = 0.1
    losses, metrics = _pair("dpo", beta=beta, split_vocab=False)
    assert losses[0] == pytest.approx(_nll_sigmoid(beta * (G_W - G_L)), rel=1e-12)
    assert metrics["rewards/chosen"][0] == pytest.approx(beta * G_W, rel=1e-12)
    assert metrics["rewards/rejected"][0] == pytest.approx(beta * G_L, rel=1e-12)
    assert metrics["risk/chosen"][0] == pytest.approx(RHO_W, rel=1e-12)  # reported only
    assert metrics["kl/rejected"][0] == pytest.approx(KL_L, rel=1e-12)
    assert metrics["logps/chosen"][0] == pytest.approx(LN(0.75), rel=1e-12)
    assert metrics["logps/rejected"][0] == pytest.approx(LN(0.5), rel=1e-12)
    assert metrics["rewards/accuracies"][0] == 1.0

    losses, metrics = _pair("ra_dpo", beta=beta, split_vocab=False)
    z = beta * ((G_W - G_L) - (RHO_L - RHO_W))
    assert losses[0] == pytest.approx(_nll_sigmoid(z), rel=1e-12)
    assert metrics["rewards/chosen"][0] == pytest.approx(beta * (G_W + RHO_W), rel=1e-12)
    assert metrics["rewards/rejected"][0] == pytest.approx(beta * (G_L + RHO_L), rel=1e-12)
    assert metrics["rewards/margins"][0] == pytest.approx(
        beta * (G_W + RHO_W - G_L - RHO_L), rel=1e-12
    )
    assert metrics["risk/rejected"][0] == pytest.approx(RHO_L, rel=1e-12)

    losses, _ = _pair("ra_dpo", beta=beta, version=2, alpha=0.5, split_vocab=False)
    z = beta * ((G_W - G_L) - 0.5 * (RHO_L - RHO_W))
    assert losses[0] == pytest.approx(_nll_sigmoid(z), rel=1e-12)

    # V = 2 split into halves of size 1: rho = 0 everywhere, so Ra-DPO1 is DPO.
    losses, metrics = _pair("ra_dpo", beta=beta, split_vocab=True)
    assert losses[0] == pytest.approx(_nll_sigmoid(beta * (G_W - G_L)), rel=1e-12)
    assert metrics["risk/chosen"][0] == 0.0

    for version, weight in ((1, 1.0), (2, 0.3)):
        losses, metrics = _pair("tdpo", beta=beta, version=version, alpha=0.3)
        z = beta * ((G_W - G_L) - weight * (KL_L - KL_W))
        assert losses[0] == pytest.approx(_nll_sigmoid(z), rel=1e-12)
        assert metrics["rewards/chosen"][0] == pytest.approx(beta * (G_W + KL_W), rel=1e-12)
        assert metrics["risk/chosen"][0] == pytest.approx(KL_W, rel=1e-12)
        assert metrics["kl/chosen"][0] == pytest.approx(KL_W, rel=1e-12)


def _random_pairs(pairs=2, t=4, v=6, seed=0):
    rng = np.random.default_rng(seed)
    policy = 2.0 * rng.normal(size=(2 * pairs, t, v))
    refl = policy + rng.normal(size=(2 * pairs, t, v))
    labels = rng.integers(0, v, size=(2 * pairs, t))
    mask = np.zeros((2 * pairs, t), bool)
    mask[:, 1:] = True
    mask[-1, -1] = False
    return policy, refl, labels, mask


def test_pair_loss_at_identity_is_log_two():
    policy, _, labels, mask = _random_pairs()
    for loss in ("dpo", "tdpo", "ra_dpo"):
        for risk in ("cvar_reference", "cvar", "erm", "kl"):
            losses, metrics = ref.pair_loss(loss, policy, policy, labels, mask, risk=risk)
            np.testing.assert_allclose(losses, np.full(2, LN(2.0)), rtol=1e-12)
            np.testing.assert_allclose(metrics["rewards/margins"], 0.0, atol=1e-12)
            assert set(metrics) == set(ref.METRIC_NAMES)
            assert all(value.shape == (2,) for value in metrics.values())


def test_pair_loss_limit_identities():
    policy, refl, labels, mask = _random_pairs(seed=5)
    kwargs = dict(beta=0.2, mu=0.7, gamma=1.0)
    dpo, _ = ref.pair_loss("dpo", policy, refl, labels, mask, **kwargs)
    # Ra-DPO2 with alpha = 0 is DPO.
    ra2, _ = ref.pair_loss("ra_dpo", policy, refl, labels, mask, version=2, alpha=0.0, **kwargs)
    np.testing.assert_allclose(ra2, dpo, rtol=1e-12)
    # TDPO is Ra-DPO with the kl risk at gamma = 1.
    for version in (1, 2):
        tdpo, m_t = ref.pair_loss("tdpo", policy, refl, labels, mask, version=version, **kwargs)
        ra, m_r = ref.pair_loss(
            "ra_dpo", policy, refl, labels, mask, version=version, risk="kl", **kwargs
        )
        np.testing.assert_allclose(tdpo, ra, rtol=1e-12)
        np.testing.assert_allclose(m_t["rewards/margins"], m_r["rewards/margins"], rtol=1e-12)
    # Textbook CVaR at mu = 1 is the KL, so Ra-DPO with it is TDPO.
    ra, _ = ref.pair_loss("ra_dpo", policy, refl, labels, mask, risk="cvar", beta=0.2, mu=1.0)
    tdpo, _ = ref.pair_loss("tdpo", policy, refl, labels, mask, beta=0.2)
    np.testing.assert_allclose(ra, tdpo, rtol=1e-10)


def test_pair_loss_is_stable_for_large_logits_and_checks_arguments():
    policy, refl, labels, mask = _random_pairs()
    losses, _ = ref.pair_loss("dpo", 400.0 * policy, refl, labels, mask, beta=1.0)
    assert np.all(np.isfinite(losses))
    with pytest.raises(ValueError):
        ref.pair_loss("ipo", policy, refl, labels, mask)
    with pytest.raises(ValueError):
        ref.pair_loss("ra_dpo", policy, refl, labels, mask, version=3)
    with pytest.raises(ValueError):
        ref.pair_loss("dpo", policy[:3], refl[:3], labels[:3], mask[:3])
