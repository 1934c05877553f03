"""Bad input at the public entry points gets a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from rsa_jax import losses
from rsa_jax.testing.cases import make_case


@pytest.fixture
def case():
    return make_case(2, 4, 9, seed=0)


def test_mismatched_shapes(case):
    policy, reference, labels, mask = case
    with pytest.raises(ValueError, match="ref_logits"):
        losses.logits_pair_loss(policy, reference[:, :, :5], labels, mask)
    with pytest.raises(ValueError, match="labels .* loss_mask"):
        losses.logits_pair_loss(policy, reference, labels, mask[:, :3])
    with pytest.raises(ValueError, match="even"):
        losses.logits_pair_loss(policy[:3], reference[:3], labels[:3], mask[:3])
    h = np.zeros((4, 4, 6), np.float32)
    w = np.zeros((6, 9), np.float32)
    with pytest.raises(ValueError, match="policy_unembed"):
        losses.fused_pair_loss(h, w.T, h, w.T, labels, mask)
    with pytest.raises(ValueError, match="ref_unembed"):
        losses.fused_pair_loss(h, w, h, w[:, :4], labels, mask)
    with pytest.raises(ValueError, match="ref_hidden"):
        losses.fused_pair_loss(h, w, h[:2], w, labels, mask)


@pytest.mark.parametrize(
    ("risk", "mu"),
    [
        ("cvar_reference", 0.0),
        ("cvar_reference", 1.5),
        ("cvar", -0.1),
        ("cvar", 1.01),
        ("erm", 0.0),
        ("erm", -2.0),
    ],
)
def test_mu_outside_domain(case, risk, mu):
    with pytest.raises(ValueError, match=f"risk '{risk}' needs .* got mu={mu}"):
        losses.logits_pair_loss(*case, risk=risk, mu=mu)


def test_non_boolean_mask(case):
    policy, reference, labels, mask = case
    with pytest.raises(TypeError, match="loss_mask must be boolean"):
        losses.logits_pair_loss(policy, reference, labels, mask.astype(np.int32))
    with pytest.raises(TypeError, match="labels must be integer"):
        losses.logits_pair_loss(policy, reference, labels.astype(np.float32), mask)


def test_nan_in_logits(case):
    policy, reference, labels, mask = case
    policy = policy.copy()
    policy[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="policy_logits contains NaN"):
        losses.logits_pair_loss(policy, reference, labels, mask)
    h = np.full((4, 4, 6), np.nan, np.float32)
    w = np.zeros((6, 9), np.float32)
    with pytest.raises(ValueError, match="policy_hidden contains NaN"):
        losses.fused_pair_loss(h, w, np.zeros_like(h), w, labels, mask)


def test_unknown_names(case):
    with pytest.raises(ValueError, match="unknown loss 'ipo'"):
        losses.logits_pair_loss(*case, loss="ipo")
    with pytest.raises(ValueError, match="unknown risk 'var'"):
        losses.logits_pair_loss(*case, risk="var")
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        losses.logits_pair_loss(*case, version=3)
