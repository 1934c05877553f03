"""Properties every registered loss and risk functional must have, and the limit identities."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rsa_jax import losses
from rsa_jax.testing.cases import make_case

# The cases of each grid that the default suite runs; `make test-slow` runs every case
# (tests/conftest.py marks the others slow).
DEFAULT_CASES = {
    "test_shapes_finite_gradients_and_padding": [
        "dpo-kl",
        "tdpo-cvar",
        "ra_dpo-erm",
        "ra_dpo-cvar_reference",
    ],
    "test_check_grads": ["ra_dpo-cvar", "tdpo-kl"],
    "test_bf16_inputs_are_upcast": ["ra_dpo-kl"],
    "test_compiles_once_and_vmaps_over_hyperparameters": ["cvar"],
    "test_cvar_reference_cut_survives_an_ulp_of_recomputation": ["False-463"],
    "test_cvar_reference_cut_from_the_selected_pair_equals_the_masked_passes": ["24"],
}

COMBOS = [(loss, risk) for loss in sorted(losses.LOSSES) for risk in sorted(losses.RISKS)]
MU = {"cvar_reference": 0.9, "cvar": 0.4, "erm": 3.0, "kl": 0.5}


def _hp(risk, beta=0.2, alpha=0.6, gamma=1.0):
    return {"beta": beta, "alpha": alpha, "mu": MU[risk], "gamma": gamma}


@functools.partial(jax.jit, static_argnames=("loss", "risk", "version"))
def _mean_loss(policy, reference, labels, mask, hp, *, loss, risk, version):
    per_pair, metrics = losses.logits_pair_loss(
        policy, reference, labels, mask, loss=loss, risk=risk, version=version, **hp
    )
    return per_pair.mean(), (per_pair, metrics)


_grad = jax.jit(
    jax.grad(_mean_loss.__wrapped__, argnums=(0, 1), has_aux=True),
    static_argnames=("loss", "risk", "version"),
)


@pytest.mark.parametrize(("loss", "risk"), COMBOS)
def test_shapes_finite_gradients_and_padding(loss, risk):
    policy, reference, labels, mask = make_case(3, 6, 13, seed=1)
    assert not mask.any(axis=1).all()  # the case has fully padded rows
    hp = _hp(risk)
    (g_policy, g_ref), (per_pair, metrics) = _grad(
        policy, reference, labels, mask, hp, loss=loss, risk=risk, version=2
    )
    assert per_pair.shape == (3,) and per_pair.dtype == jnp.float32
    assert all(m.shape == (3,) for m in metrics.values())
    assert np.isfinite(per_pair).all()
    assert np.isfinite(g_policy).all()
    # Gradients flow to the policy only, and never into padded positions.
    assert not np.any(g_ref)
    assert not np.any(np.asarray(g_policy)[~mask])
    assert np.any(np.asarray(g_policy)[mask])

    # Padding invariance: junk in padded positions and extra padded steps change nothing.
    rng = np.random.default_rng(2)
    junk_policy = np.where(mask[..., None], policy, 50 * rng.normal(size=policy.shape))
    pad = ((0, 0), (0, 3), (0, 0))
    longer = (
        np.pad(junk_policy, pad).astype(np.float32),
        np.pad(reference, pad).astype(np.float32),
        np.pad(labels, pad[:2]),
        np.pad(mask, pad[:2]),
    )
    _, (per_pair_longer, metrics_longer) = _mean_loss(*longer, hp, loss=loss, risk=risk, version=2)
    np.testing.assert_allclose(per_pair_longer, per_pair, rtol=1e-6, atol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(metrics_longer[name], metrics[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("loss", "risk"), [("ra_dpo", r) for r in sorted(losses.RISKS)])
def test_bf16_inputs_are_upcast(loss, risk):
    policy, reference, labels, mask = make_case(2, 5, 11, seed=3)
    bf_policy, bf_ref = jnp.asarray(policy, jnp.bfloat16), jnp.asarray(reference, jnp.bfloat16)
    hp = _hp(risk)
    _, (from_bf16, _) = _mean_loss(
        bf_policy, bf_ref, labels, mask, hp, loss=loss, risk=risk, version=1
    )
    _, (from_f32, _) = _mean_loss(
        bf_policy.astype(jnp.float32),
        bf_ref.astype(jnp.float32),
        labels,
        mask,
        hp,
        loss=loss,
        risk=risk,
        version=1,
    )
    assert from_bf16.dtype == jnp.float32
    np.testing.assert_array_equal(from_bf16, from_f32)


@pytest.mark.parametrize("risk", sorted(losses.RISKS))
def test_compiles_once_and_vmaps_over_hyperparameters(risk):
    policy, reference, labels, mask = make_case(2, 5, 9, seed=4)
    traces = []

    @jax.jit
    def run(hp):
        traces.append(1)
        return losses.logits_pair_loss(
            policy, reference, labels, mask, loss="ra_dpo", risk=risk, version=2, **hp
        )[0]

    lo, hi = (0.2, 0.95) if risk.startswith("cvar") else (0.1, 4.0)
    grid = {
        "beta": jnp.array([0.05, 0.1, 0.5]),
        "alpha": jnp.array([0.0, 0.5, 1.0]),
        "mu": jnp.array([lo, (lo + hi) / 2, hi]),
        "gamma": jnp.array([1.0, 0.9, 0.5]),
    }
    looped = [run(jax.tree.map(lambda x, i=i: x[i], grid)) for i in range(3)]
    assert len(traces) == 1, "changing hyperparameter values recompiled"
    vmapped = jax.vmap(run)(grid)
    np.testing.assert_allclose(vmapped, np.stack(looped), rtol=1e-6, atol=1e-6)


def _losses(loss, risk, policy, reference, labels, mask, **hp):
    return np.asarray(
        losses.logits_pair_loss(policy, reference, labels, mask, loss=loss, risk=risk, **hp)[0]
    )


@pytest.mark.slow  # the risk limits over a grid of mu (about 35 s on 2 cores)
def test_limit_identities():
    policy, reference, labels, mask = make_case(3, 6, 17, seed=5)
    args = (policy, reference, labels, mask)
    dpo = _losses("dpo", "kl", *args, beta=0.2)
    # Version 2 with alpha = 0 is DPO, for every risk.
    for risk in losses.RISKS:
        np.testing.assert_allclose(
            _losses("ra_dpo", risk, *args, beta=0.2, alpha=0.0, version=2, mu=MU[risk]),
            dpo,
            rtol=1e-6,
            atol=1e-6,
        )
    # The `kl` risk turns Ra-DPO into TDPO (both versions).
    for version in (1, 2):
        np.testing.assert_allclose(
            _losses("ra_dpo", "kl", *args, beta=0.2, version=version),
            _losses("tdpo", "kl", *args, beta=0.2, version=version),
            rtol=1e-6,
            atol=1e-6,
        )
    # Identical policy and reference: margins and KL vanish, the loss is log 2.
    for risk in losses.RISKS:
        same = _losses("ra_dpo", risk, policy, policy, labels, mask, beta=0.2, mu=MU[risk])
        np.testing.assert_allclose(same, np.log(2.0), rtol=1e-6)


def test_risk_limits_per_position():
    policy, reference, labels, _ = make_case(2, 4, 300, seed=6)
    stats = {
        (risk, mu): losses.token_stats(
            policy,
            reference,
            labels,
            risk=risk,
            mu=mu,
            tail=losses.quantile_tail(mu),
            split_vocab=True,
        )
        for risk, mu in [("cvar", 1.0), ("erm", 1e-5), ("kl", 0.5), ("cvar", 0.5), ("erm", 2.0)]
    }
    kl = stats[("kl", 0.5)].rho
    np.testing.assert_allclose(stats[("kl", 0.5)].kl, kl, rtol=1e-6)
    np.testing.assert_allclose(stats[("cvar", 1.0)].rho, kl, rtol=1e-5, atol=1e-5)  # CVaR_1 = KL
    np.testing.assert_allclose(stats[("erm", 1e-5)].rho, kl, rtol=1e-4, atol=1e-4)  # ERM_0 = KL
    # Risk-averse functionals sit above the mean.
    assert np.all(stats[("cvar", 0.5)].rho >= kl - 1e-6)
    assert np.all(stats[("erm", 2.0)].rho >= kl - 1e-6)


def test_nested_value_with_gamma_one_is_masked_sum():
    _, _, _, mask = make_case(4, 10, 3, seed=8)
    rho = np.random.default_rng(8).normal(size=mask.shape).astype(np.float32)
    values = losses.nested_risk_value(rho, mask, 1.0)
    np.testing.assert_allclose(values[:, 0], np.where(mask, rho, 0).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("loss", "risk"),
    [
        ("ra_dpo", "cvar_reference"),
        ("ra_dpo", "cvar"),
        ("ra_dpo", "erm"),
        ("tdpo", "kl"),
        ("dpo", "kl"),
    ],
)
def test_check_grads(loss, risk):
    policy, reference, labels, mask = make_case(1, 3, 7, seed=9, scale=1.0)

    def f(p):
        per_pair, _ = losses.logits_pair_loss(
            p, reference, labels, mask, loss=loss, risk=risk, version=1, beta=0.5, mu=MU[risk]
        )
        return per_pair.sum()

    check_grads(f, (jnp.asarray(policy, jnp.float32),), order=1, modes=["rev"], eps=1e-3)


def test_version_2_stops_the_gradient_of_the_chosen_risk():
    ones = jnp.ones(3)
    chosen = losses.SequenceStats(logp=ones, M=0.5 * ones, K=ones, S=ones)
    rejected = losses.SequenceStats(logp=ones, M=0.2 * ones, K=ones, S=2.0 * ones)

    def total(chosen_s, rejected_s, version):
        per_pair, _ = losses.ra_dpo(
            chosen._replace(S=chosen_s),
            rejected._replace(S=rejected_s),
            beta=0.1,
            alpha=0.5,
            version=version,
        )
        return per_pair.sum()

    d_chosen_v1, d_rejected_v1 = jax.grad(total, argnums=(0, 1))(chosen.S, rejected.S, 1)
    d_chosen_v2, d_rejected_v2 = jax.grad(total, argnums=(0, 1))(chosen.S, rejected.S, 2)
    assert np.all(d_chosen_v1 != 0) and np.all(d_rejected_v1 != 0)
    assert np.all(d_chosen_v2 == 0) and np.all(d_rejected_v2 != 0)
    # alpha scales the rejected side's gradient in version 2 relative to version 1's unit weight.
    z1 = 0.1 * (0.3 - (2.0 - 1.0))
    z2 = 0.1 * (0.3 - 0.5 * (2.0 - 1.0))
    np.testing.assert_allclose(d_rejected_v1, 0.1 * jax.nn.sigmoid(-z1), rtol=1e-6)
    np.testing.assert_allclose(d_rejected_v2, 0.05 * jax.nn.sigmoid(-z2), rtol=1e-6)


@pytest.mark.parametrize("risk", sorted(losses.RISKS))
def test_finite_gradients_when_policy_equals_reference(risk):
    """Every stage starts with policy == reference: all log-ratios are 0 there."""
    policy, _, labels, mask = make_case(2, 4, 9, seed=10)
    (g_policy, _), (per_pair, _) = _grad(
        policy, policy, labels, mask, _hp(risk), loss="ra_dpo", risk=risk, version=1
    )
    np.testing.assert_allclose(per_pair, np.log(2.0), rtol=1e-6)
    assert np.isfinite(g_policy).all() and np.any(g_policy)


@pytest.mark.parametrize("split_vocab,v", [(True, 462), (False, 463)])
def test_cvar_reference_cut_survives_an_ulp_of_recomputation(split_vocab, v):
    """The fused head's backward pass compares a recomputed d with its forward pass's thresholds,
    and the recomputation may round d differently by an ulp. At an integer quantile rank (here
    mu = 0.5 over 231 values: rank 0.5 * 230 = 115, lerp weight 0) torch's threshold *is* the
    rank-k value, so a threshold placed on it would let that ulp decide whether the entry's
    gradient q(v) counts. The threshold keeps torch's entries and sits in the middle of the gap."""
    from rsa_jax.losses._risk import cvar_reference_threshold

    rng = np.random.default_rng(0)
    d = (0.01 * rng.normal(size=(64, v))).astype(np.float32)
    q = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(64, v)), jnp.float32)))
    kw = dict(mu=0.5, tail=losses.quantile_tail(0.5), split_vocab=split_vocab)
    tau = cvar_reference_threshold(jnp.asarray(d), jnp.asarray(q), **kw)
    # torch's entries: everything strictly above the rank-k value of each half (weight 0).
    halves = [slice(0, v // 2), slice(v // 2, v)] if split_vocab else [slice(0, v)]
    want = np.zeros(d.shape, bool)
    for part in halves:
        n = part.stop - part.start
        assert (n - 1) % 2 == 0  # an integer rank: the case under test
        kth = np.sort(d[:, part], axis=-1)[:, (n - 1) // 2]
        want[:, part] = d[:, part] > kth[:, None]

    def mask(values):  # d(rho)/d(d) = q on the kept entries, 0 elsewhere
        grad = jax.grad(lambda x: losses.cvar_reference(x, q, threshold=tau, **kw).sum())
        return np.asarray(grad(jnp.asarray(values))) != 0

    np.testing.assert_array_equal(mask(d), want)
    for moved in (np.nextafter(d, np.float32(np.inf)), np.nextafter(d, np.float32(-np.inf))):
        np.testing.assert_array_equal(mask(moved), want)
    # The loss value is torch's: the same entries, with or without the precomputed threshold.
    np.testing.assert_allclose(
        losses.cvar_reference(jnp.asarray(d), q, **kw),
        np.sum(np.where(want, q * d, 0.0), -1),
        rtol=1e-6,
        atol=1e-9,
    )


@pytest.mark.parametrize("w", [24, 25])
def test_cvar_reference_cut_from_the_selected_pair_equals_the_masked_passes(w):
    """`_cut` reads the gap around torch's threshold off the two selected order statistics and
    runs the masked max/min passes only where the threshold lands on the upper one (ties at the
    rank). Rows of both kinds, alone and mixed in one call, plain and vmapped, padded and not: the
    same threshold, bit for bit, as `_middle_of_cut` over the row."""
    from rsa_jax.losses._risk import _cut, _linear_quantile, _middle_of_cut

    rng = np.random.default_rng(w)
    n = 23  # valid entries per row: the last column is padding when w = 24
    valid = jnp.asarray(np.broadcast_to(np.arange(w) < n, (6, w)))
    generic = rng.normal(size=(6, w)).astype(np.float32)
    tied = np.round(rng.normal(size=(6, w))).astype(np.float32)  # many ties at every rank
    tied[0] = 0.5  # a constant row
    tied[1, : n // 2] = -0.0  # zeros of both signs
    tied[1, n // 2 :] = 0.0
    mixed = np.concatenate([generic[:3], tied[:3]])
    for mu in (0.95, 0.5, 0.7):  # rank 1.1, 11 (lerp weight 0), 6.6 over 23 values
        tail = losses.quantile_tail(mu)

        def both(x, tail=tail):
            return _cut(x, valid, n, tail), _middle_of_cut(
                x, valid, _linear_quantile(x, valid, n, tail)
            )

        for x in (generic, tied, mixed):
            got, want = jax.jit(both)(jnp.asarray(x))
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        stacked = jnp.asarray(np.stack([generic, tied, mixed]))
        got, want = jax.jit(jax.vmap(both))(stacked)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cvar_cuts_survive_an_ulp_of_recomputation():
    """Textbook `cvar` splits the mass of its VaR atom, one of the values of d; its weights in the
    fused head's backward (a recomputed d against the forward's cuts) must not move by an ulp."""
    from rsa_jax.losses._risk import cvar_threshold

    rng = np.random.default_rng(1)
    d = (0.01 * rng.normal(size=(64, 462))).astype(np.float32)
    q = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(64, 462)), jnp.float32)))
    kw = dict(mu=0.4, tail=losses.quantile_tail(0.4), split_vocab=True)
    cuts = cvar_threshold(jnp.asarray(d), jnp.asarray(q), **kw)

    def weights(values):  # d(rho)/d(d) = w / mu
        grad = jax.grad(lambda x: losses.cvar(x, q, threshold=cuts, **kw).sum())
        return np.asarray(grad(jnp.asarray(values)))

    want = weights(d)
    assert np.all(np.sum(want > 0, axis=-1) >= 1)
    np.testing.assert_allclose(want.sum(-1), 1.0, rtol=1e-5)  # w sums to mu: w / mu to 1
    for moved in (np.nextafter(d, np.float32(np.inf)), np.nextafter(d, np.float32(-np.inf))):
        np.testing.assert_array_equal(weights(moved), want)
