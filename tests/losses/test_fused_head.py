"""The fused head (hidden states + unembedding, chunked scan) equals the logits path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from rsa_jax import losses
from rsa_jax.testing.cases import make_mask

# The cases of each grid that the default suite runs; `make test-slow` runs every case
# (tests/conftest.py marks the others slow).
DEFAULT_CASES = {
    "test_fused_equals_logits_path": ["1-kl", "4-cvar", "64-cvar_reference"],
    "test_fused_equals_logits_more_settings_and_mu_gradient": ["cvar-2-0.7-True"],
    "test_fused_memory_scales_with_chunk_not_length": ["cvar"],
}

B, T, D, V = 2, 11, 8, 37
MU = {"cvar_reference": 0.9, "cvar": 0.4, "erm": 3.0, "kl": 0.5}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    h_policy = rng.normal(size=(2 * B, T, D)).astype(np.float32)
    w_policy = rng.normal(size=(D, V)).astype(np.float32)
    h_ref = (h_policy + 0.3 * rng.normal(size=h_policy.shape)).astype(np.float32)
    w_ref = (w_policy + 0.3 * rng.normal(size=w_policy.shape)).astype(np.float32)
    labels = rng.integers(0, V, size=(2 * B, T)).astype(np.int32)
    mask = make_mask(2 * B, T, rng)
    return h_policy, w_policy, h_ref, w_ref, labels, mask


def _fused_mean(h_p, w_p, h_r, w_r, labels, mask, *, risk, chunk_size):
    per_pair, metrics = losses.fused_pair_loss(
        h_p,
        w_p,
        h_r,
        w_r,
        labels,
        mask,
        risk=risk,
        mu=MU[risk],
        beta=0.5,
        version=1,
        chunk_size=chunk_size,
    )
    return per_pair.mean(), metrics


def _logits_mean(h_p, w_p, h_r, w_r, labels, mask, *, risk):
    per_pair, metrics = losses.logits_pair_loss(
        h_p @ w_p, h_r @ w_r, labels, mask, risk=risk, mu=MU[risk], beta=0.5, version=1
    )
    return per_pair.mean(), metrics


grad_fused = jax.jit(
    jax.value_and_grad(_fused_mean, argnums=(0, 1, 2, 3), has_aux=True),
    static_argnames=("risk", "chunk_size"),
)
grad_logits = jax.jit(
    jax.value_and_grad(_logits_mean, argnums=(0, 1, 2, 3), has_aux=True),
    static_argnames=("risk",),
)


@pytest.mark.parametrize("risk", sorted(losses.RISKS))
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_fused_equals_logits_path(risk, chunk_size):
    args = _inputs()
    (loss_f, metrics_f), grads_f = grad_fused(*args, risk=risk, chunk_size=chunk_size)
    (loss_l, metrics_l), grads_l = grad_logits(*args, risk=risk)
    np.testing.assert_allclose(loss_f, loss_l, rtol=1e-5, atol=1e-5)
    for name in metrics_l:
        np.testing.assert_allclose(metrics_f[name], metrics_l[name], rtol=1e-5, atol=1e-5)
    # Gradients reach the policy hidden states and unembedding, and nothing of the reference.
    for got, want in zip(grads_f[:2], grads_l[:2], strict=True):
        assert np.any(want)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.any(grads_f[2]) and not np.any(grads_f[3])


def test_fused_bf16_hidden_states():
    h_p, w_p, h_r, w_r, labels, mask = _inputs(1)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (h_p, w_p, h_r, w_r)]
    (loss_bf, _), grads = grad_fused(*bf, labels, mask, risk="cvar_reference", chunk_size=4)
    up = [x.astype(jnp.float32) for x in bf]
    (loss_up, _), _ = grad_logits(*up, labels, mask, risk="cvar_reference")
    assert loss_bf.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
    assert np.isfinite(loss_bf) and all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
    np.testing.assert_allclose(loss_bf, loss_up, rtol=1e-5, atol=1e-5)


def _head_matmuls(jaxpr, times=1) -> int:
    """Head matmuls a jaxpr runs: `dot_general`s with a V-sized operand or output, each counted
    once per run (a scan body `length` times)."""
    count = 0
    for eqn in jaxpr.eqns:
        avals = [v.aval for v in (*eqn.invars, *eqn.outvars) if hasattr(v, "aval")]
        if eqn.primitive.name == "dot_general" and any(V in a.shape for a in avals):
            count += times
        runs = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    count += _head_matmuls(sub.jaxpr, runs)
                elif isinstance(sub, jax_core.Jaxpr):
                    count += _head_matmuls(sub, runs)
    return count


@pytest.mark.parametrize(("chunk_size", "chunks"), [(64, 1), (4, 3), (1, 11)])
def test_fused_recomputes_all_chunks_but_the_last(chunk_size, chunks):
    """Value and gradient run 6K - 2 head matmuls for K chunks: both models' logits per chunk, the
    two transposes per chunk, and both models' recomputed logits for every chunk but the last
    (the backward pass starts with it while its logits are still alive)."""
    args = _inputs()

    def loss(h_p, w_p, h_r, w_r):
        return _fused_mean(
            h_p, w_p, h_r, w_r, *args[4:], risk="cvar_reference", chunk_size=chunk_size
        )[0]

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(*args[:4])
    assert _head_matmuls(jaxpr.jaxpr) == 6 * chunks - 2


def _peak_temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("risk", ["cvar_reference", "cvar"])
def test_fused_memory_scales_with_chunk_not_length(risk):
    """Compiled temporary memory of value-and-grad: the logits path grows with T, fused with C."""
    rng = np.random.default_rng(2)
    d, v = 16, 4096

    def peaks(t):
        h = rng.normal(size=(2, t, d)).astype(np.float32)
        w = rng.normal(size=(d, v)).astype(np.float32)
        labels = np.zeros((2, t), np.int32)
        mask = np.ones((2, t), bool)

        def fused(h, w):
            return losses.fused_pair_loss(
                h, w, h, w, labels, mask, risk=risk, mu=0.5, chunk_size=16
            )[0].sum()

        def logits(h, w):
            return losses.logits_pair_loss(h @ w, h @ w, labels, mask, risk=risk, mu=0.5)[0].sum()

        grad = functools.partial(jax.grad, argnums=(0, 1))
        return _peak_temp_bytes(grad(fused), h, w), _peak_temp_bytes(grad(logits), h, w)

    fused_256, _ = peaks(256)
    fused_1024, logits_1024 = peaks(1024)
    all_logits = 2 * 1024 * v * 4  # one [2, T, V] float32 tensor
    assert logits_1024 > all_logits
    assert fused_1024 < all_logits / 4
    assert fused_1024 < 1.25 * fused_256


@pytest.mark.parametrize(
    ("risk", "version", "gamma", "split"),
    [("cvar_reference", 2, 0.9, False), ("cvar", 2, 0.7, True), ("erm", 1, 0.9, True)],
)
def test_fused_equals_logits_more_settings_and_mu_gradient(risk, version, gamma, split):
    h_p, w_p, h_r, w_r, labels, mask = _inputs(3)

    def run(path, h, w, mu):
        kwargs = dict(
            risk=risk,
            version=version,
            gamma=gamma,
            split_vocab=split,
            mu=mu,
            beta=0.5,
            alpha=0.7,
            tail=1.0 - mu,
        )
        if path == "fused":
            out = losses.fused_pair_loss(h, w, h_r, w_r, labels, mask, chunk_size=4, **kwargs)
        else:
            out = losses.logits_pair_loss(h @ w, h_r @ w_r, labels, mask, **kwargs)
        return out[0].mean()

    mu = jnp.float32(0.6 if risk != "erm" else 2.0)
    grad = jax.jit(jax.value_and_grad(run, argnums=(1, 2, 3)), static_argnums=0)
    value_f, grads_f = grad("fused", h_p, w_p, mu)
    value_l, grads_l = grad("logits", h_p, w_p, mu)
    np.testing.assert_allclose(value_f, value_l, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_f, grads_l, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if risk != "cvar_reference":  # its mu enters only through the (gradient-free) mask
        assert grads_l[2] != 0
