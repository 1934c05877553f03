"""The sampling driver: samples decode to what was generated, teacher-forced log-probabilities
equal a direct computation, and the sample KL estimate converges to the exact KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsa_jax.eval import evaluate_model, response_logprob, sample
from rsa_jax.models import Llama, tiny_config
from rsa_jax.tasks import TEMPLATE, OracleScorer, SafetyTask, make_tokenizer

TASK = SafetyTask()
TOK = make_tokenizer(TASK)
PROMPTS = ["ask topic0 style1 n2", "ask topic3 style5 n0", "ask topic7 style0 n9"]


def _model(seed):
    config = tiny_config(vocab_size=len(TOK), max_position_embeddings=64)
    return Llama(config, rngs=nnx.Rngs(seed), param_dtype=jnp.float32, compute_dtype=jnp.float32)


def test_samples_are_consistent_and_reproducible_and_logprobs_equal_a_direct_forward():
    model = _model(0)
    s = sample(model, TOK, PROMPTS, n=5, max_new_tokens=6, seed=1, template=TEMPLATE)
    np.testing.assert_array_equal(s.prompt_index, np.repeat([0, 1, 2], 5))
    assert s.tokens.shape == (15, 6) and len(s.texts) == 15
    eos = TOK.eos_token_id
    for row, length, done, text in zip(s.tokens, s.lengths, s.finished, s.texts, strict=True):
        assert done == (row[length - 1] == eos)
        body = row[: length - 1] if done else row[:length]
        assert text == TOK.decode(body.tolist(), skip_special_tokens=True)
    again = sample(model, TOK, PROMPTS, n=5, max_new_tokens=6, seed=1, template=TEMPLATE)
    np.testing.assert_array_equal(again.tokens, s.tokens)
    got = response_logprob(model, s)
    for r in range(0, len(s.lengths), 4):
        prompt = s.prompt_ids[r][s.prompt_mask[r]]
        response = s.tokens[r, : s.lengths[r]]
        ids = np.concatenate([prompt, response])[None]
        pos = np.arange(ids.shape[1])[None]
        logits = model.logits(model(jnp.asarray(ids), jnp.asarray(pos), jnp.ones_like(ids, bool)))
        logp = jax.nn.log_softmax(logits[0], axis=-1)
        want = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response))
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # thousands of samples (about 20 s on 2 cores)
def test_kl_estimate_converges_to_the_exact_kl_of_one_token_responses():
    policy, reference = _model(0), _model(1)
    prompts = PROMPTS[:1]
    scores, _ = evaluate_model(
        policy,
        TOK,
        prompts,
        OracleScorer(TASK),
        reference=reference,
        n=3000,
        max_new_tokens=1,
        seed=3,
        template=TEMPLATE,
    )
    ids = TOK(TEMPLATE.format(prompt=prompts[0]))["input_ids"]
    x = jnp.asarray([ids])
    pos, mask = jnp.arange(len(ids))[None], jnp.ones_like(x, bool)
    p = jax.nn.log_softmax(policy.logits(policy(x, pos, mask))[0, -1])
    q = jax.nn.log_softmax(reference.logits(reference(x, pos, mask))[0, -1])
    exact = float(jnp.sum(jnp.exp(p) * (p - q)))
    estimate = scores.logratio.mean()
    stderr = scores.logratio.std() / np.sqrt(len(scores.logratio))
    assert exact > 0.01  # the two models really differ
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)
    # And against itself the log-ratios are exactly zero.
    same, _ = evaluate_model(
        policy,
        TOK,
        prompts,
        OracleScorer(TASK),
        reference=policy,
        n=3000,
        max_new_tokens=1,
        seed=4,
        template=TEMPLATE,
    )
    assert np.all(same.logratio == 0)
