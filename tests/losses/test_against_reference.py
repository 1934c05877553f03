"""Every kernel against the slow NumPy references of rsa_jax.testing (written from the spec)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsa_jax import losses
from rsa_jax.testing import reference as ref
from rsa_jax.testing.cases import make_case

# The cases of each grid that the default suite runs; `make test-slow` runs every case
# (tests/conftest.py marks the others slow).
DEFAULT_CASES = {
    "test_pair_losses_and_metrics": [
        "1.0-dpo-kl-1-0.5",
        "1.0-tdpo-kl-1-0.5",
        "1.0-tdpo-kl-2-0.5",
        "1.0-ra_dpo-cvar_reference-1-0.95",
        "1.0-ra_dpo-cvar_reference-2-0.95",
        "1.0-ra_dpo-cvar-1-0.5",
        "1.0-ra_dpo-erm-2-5.0",
        "1.0-ra_dpo-kl-1-0.5",
        "0.9-tdpo-kl-2-0.5",
        "0.9-ra_dpo-cvar_reference-1-0.95",
    ],
    "test_token_stats": ["cvar-33", "cvar_reference-33", "erm-33", "kl-33", "cvar_reference-4096"],
    "test_cvar_reference_over_mu_and_split": [
        "True-0.8-64",
        "False-0.97-1001",
        "True-1.0-7",
        "False-0.5-7",
    ],
}

RISK_MU = {"cvar_reference": 0.95, "cvar": 0.3, "erm": 2.0, "kl": 0.5}


@functools.partial(jax.jit, static_argnames=("risk", "split_vocab"))
def _token_stats(policy, reference, labels, mu, tail, *, risk, split_vocab):
    return losses.token_stats(
        policy, reference, labels, risk=risk, mu=mu, tail=tail, split_vocab=split_vocab
    )


def _stats(policy, reference, labels, *, risk, mu, split_vocab=True):
    return _token_stats(
        policy,
        reference,
        labels,
        jnp.float32(mu),
        losses.quantile_tail(mu),
        risk=risk,
        split_vocab=split_vocab,
    )


@pytest.mark.parametrize("v", [7, 8, 33, 4096])
@pytest.mark.parametrize("risk", sorted(losses.RISKS))
def test_token_stats(v, risk):
    policy, reference, labels, _ = make_case(2, 3, v, seed=v)
    mu = RISK_MU[risk]
    got = _stats(policy, reference, labels, risk=risk, mu=mu)
    want = ref.token_stats(policy, reference, labels, risk=risk, mu=mu, split_vocab=True)
    np.testing.assert_allclose(got.g, want["g"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.kl, want["kl"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.rho, want["rho"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("v", [7, 64, 1001])
@pytest.mark.parametrize("mu", [0.5, 0.8, 0.97, 1.0])
@pytest.mark.parametrize("split_vocab", [True, False])
def test_cvar_reference_over_mu_and_split(v, mu, split_vocab):
    policy, reference, labels, _ = make_case(1, 4, v, seed=int(100 * mu) + v)
    got = _stats(policy, reference, labels, risk="cvar_reference", mu=mu, split_vocab=split_vocab)
    want = ref.token_stats(
        policy, reference, labels, risk="cvar_reference", mu=mu, split_vocab=split_vocab
    )
    np.testing.assert_allclose(got.rho, want["rho"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mu", [0.05, 0.5, 0.9, 1.0])
def test_cvar_over_mu(mu):
    policy, reference, labels, _ = make_case(1, 4, 50, seed=3)
    got = _stats(policy, reference, labels, risk="cvar", mu=mu)
    want = ref.token_stats(policy, reference, labels, risk="cvar", mu=mu)
    np.testing.assert_allclose(got.rho, want["rho"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mu", [1e-4, 0.1, 1.0, 5.0, 40.0])
def test_erm_over_mu(mu):
    policy, reference, labels, _ = make_case(1, 4, 50, seed=4)
    got = _stats(policy, reference, labels, risk="erm", mu=mu)
    want = ref.token_stats(policy, reference, labels, risk="erm", mu=mu)
    np.testing.assert_allclose(got.rho, want["rho"], rtol=1e-5, atol=1e-5)


def test_cvar_reference_ties_in_the_vocabulary():
    # Vocabulary columns repeat in groups, so many entries have bit-identical log-ratios (in
    # float32 and float64 alike) and quantile ranks land inside and at the edge of tied runs.
    rng = np.random.default_rng(5)
    base_policy = rng.normal(size=(2, 6, 7)).astype(np.float32)
    base_ref = rng.normal(size=(2, 6, 7)).astype(np.float32)
    columns = np.arange(40) % 7
    policy, reference = base_policy[..., columns], base_ref[..., columns]
    labels = rng.integers(0, 40, size=(2, 6)).astype(np.int32)
    for mu in (0.5, 0.75, 0.9, 0.95):
        for split in (True, False):
            got = _stats(policy, reference, labels, risk="cvar_reference", mu=mu, split_vocab=split)
            want = ref.token_stats(
                policy, reference, labels, risk="cvar_reference", mu=mu, split_vocab=split
            )
            np.testing.assert_allclose(got.rho, want["rho"], rtol=1e-5, atol=1e-5)


def test_cvar_reference_follows_torch_rank_not_numpy():
    """mu = 0.8 on halves of 16: torch's float32 rank is 3.0, numpy's 2.9999999999999996."""
    assert float(losses.torch_rank(losses.quantile_tail(0.8), 16)) == 3.0
    assert ref.torch_quantile_rank(16, 0.8) == 3.0
    rng = np.random.default_rng(6)
    policy = rng.normal(size=(2, 3, 32)).astype(np.float32)
    reference = rng.normal(size=(2, 3, 32)).astype(np.float32)
    labels = np.zeros((2, 3), np.int32)
    got = _stats(policy, reference, labels, risk="cvar_reference", mu=0.8)
    want = ref.token_stats(policy, reference, labels, risk="cvar_reference", mu=0.8)
    np.testing.assert_allclose(got.rho, want["rho"], rtol=1e-5, atol=1e-5)
    # The numpy rank keeps one more entry per half, so the test can tell the two apart.
    logp = ref.log_softmax(policy[0, 0].astype(np.float64))
    logq = ref.log_softmax(reference[0, 0].astype(np.float64))
    d, q = logq - logp, np.exp(logq)
    numpy_rho = 0.0
    for half in (slice(0, 16), slice(16, 32)):
        tau = np.quantile(d[half], 1 - 0.8, method="linear")
        numpy_rho += np.sum((q * d)[half][d[half] > tau])
    assert abs(numpy_rho - float(got.rho[0, 0])) > 1e-4


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5, 0.0])
def test_nested_value_scan_dense_and_reference(gamma):
    rng = np.random.default_rng(7)
    _, _, _, mask = make_case(5, 9, 4, seed=7)
    rho = rng.normal(size=mask.shape).astype(np.float32)
    scan = np.asarray(losses.nested_risk_value(rho, mask, gamma))
    dense = np.asarray(losses.nested_risk_value_dense(rho, mask, gamma))
    want = np.stack([ref.nested_value(rho[i], mask[i], gamma) for i in range(len(rho))])
    np.testing.assert_allclose(scan, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnames=("loss", "risk", "version", "split_vocab"))
def _logits_loss(policy, reference, labels, mask, hp, **static):
    return losses.logits_pair_loss(policy, reference, labels, mask, **hp, **static)


def _hp(beta=0.1, alpha=0.5, mu=0.95, gamma=1.0):
    return {
        "beta": jnp.float32(beta),
        "alpha": jnp.float32(alpha),
        "mu": jnp.float32(mu),
        "gamma": jnp.float32(gamma),
        "tail": losses.quantile_tail(mu),
    }


PAIR_CASES = [
    ("dpo", "kl", 1, 0.5),
    ("tdpo", "kl", 1, 0.5),
    ("tdpo", "kl", 2, 0.5),
    ("ra_dpo", "cvar_reference", 1, 0.95),
    ("ra_dpo", "cvar_reference", 2, 0.95),
    ("ra_dpo", "cvar", 1, 0.5),
    ("ra_dpo", "erm", 2, 5.0),
    ("ra_dpo", "kl", 1, 0.5),
]


@pytest.mark.parametrize(("loss", "risk", "version", "mu"), PAIR_CASES)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_pair_losses_and_metrics(loss, risk, version, mu, gamma):
    policy, reference, labels, mask = make_case(3, 7, 19, seed=11)
    hp = dict(beta=0.3, alpha=0.7, mu=mu, gamma=gamma)
    got_losses, got_metrics = _logits_loss(
        policy,
        reference,
        labels,
        mask,
        _hp(**hp),
        loss=loss,
        risk=risk,
        version=version,
        split_vocab=True,
    )
    want_losses, want_metrics = ref.pair_loss(
        loss, policy, reference, labels, mask, risk=risk, version=version, split_vocab=True, **hp
    )
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-4, atol=1e-4)
    assert set(got_metrics) == set(want_metrics)
    for name in got_metrics:
        np.testing.assert_allclose(
            got_metrics[name], want_metrics[name], rtol=1e-4, atol=1e-4, err_msg=name
        )


def test_erm_where_reference_probabilities_underflow():
    """The largest ERM terms can sit where q(v) underflows float32 (log q < -87)."""
    policy = np.array([[[0.0, 0.0, -200.0]] * 2] * 2, np.float32)
    for ref_tail in (-90.0, -120.0):
        reference = np.array([[[0.0, 0.0, ref_tail]] * 2] * 2, np.float32)
        labels = np.zeros((2, 2), np.int32)
        got = _stats(policy, reference, labels, risk="erm", mu=5.0)
        want = ref.token_stats(policy, reference, labels, risk="erm", mu=5.0)
        assert np.isfinite(got.rho).all()
        np.testing.assert_allclose(got.rho, want["rho"], rtol=1e-5)
