"""Sampling N responses per prompt with the jitted KV-cache generator, teacher-forced
log-probabilities of those responses under the policy and a reference, and the scored samples.

Dimension legend: B prompts, N samples per prompt, S = B * N sampled rows, P prompt slots,
T new-token slots, V vocabulary.

KL(pi || pi_ref) is estimated from the samples as the mean of log pi(y|x) - log pi_ref(y|x) over
responses y ~ pi(.|x): both log-probabilities are summed over the response tokens (EOS included)
and computed the same way, by one teacher-forced forward pass of each model in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsa_jax.data import DataConfig, PairTokenizer
from rsa_jax.generate import generate

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Samples:
    """S = B * N sampled responses, row r answering prompt `prompt_index[r]`."""

    prompt_index: np.ndarray  # int [S]
    prompt_ids: np.ndarray  # int32 [S, P], left-padded
    prompt_mask: np.ndarray  # bool [S, P]
    tokens: np.ndarray  # int32 [S, T], pad after EOS
    lengths: np.ndarray  # int32 [S], tokens generated, EOS included
    finished: np.ndarray  # bool [S], the response ended with EOS within T tokens
    texts: list[str]  # decoded responses without EOS


def load_model(path: str):
    """(model, tokenizer) of a Hugging Face directory, or of a run directory's newest usable
    checkpoint (a directory with `checkpoints/`)."""
    import os

    if os.path.isdir(os.path.join(path, "checkpoints")):
        from rsa_jax.training._trainer import latest_policy

        spec, params, tokenizer = latest_policy(path)
        return spec.module(params), tokenizer
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path}: neither a run directory (checkpoints/) nor a Hugging Face model directory "
            "(config.json)"
        )
    from transformers import AutoTokenizer

    from rsa_jax.models import load_hf

    return load_hf(path), AutoTokenizer.from_pretrained(path, local_files_only=True)


def encode_prompts(tokenizer, prompts: list[str], template: str | None, max_prompt_len: int = 128):
    """Left-padded prompt ids [B, P] and mask, formatted exactly as the data pipeline does."""
    pt = PairTokenizer(tokenizer, DataConfig(template=template, max_prompt_len=max_prompt_len))
    rows = [pt.prompt_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pt.pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = True
    return ids, mask


def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n: int,
    max_new_tokens: int,
    seed: int = 0,
    template: str | None = None,
    temperature: float = 1.0,
    batch_rows: int = 4096,
) -> Samples:
    """N samples per prompt at `temperature` (1.0: from the policy itself, no truncation)."""
    ids, mask = encode_prompts(tokenizer, prompts, template)
    index = np.repeat(np.arange(len(prompts)), n)
    rows_ids, rows_mask = ids[index], mask[index]
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    key = jax.random.key(seed)
    tokens, lengths = [], []
    for start in range(0, len(index), batch_rows):
        key, sub = jax.random.split(key)
        stop = min(start + batch_rows, len(index))
        out = generate(
            model,
            rows_ids[start:stop],
            rows_mask[start:stop],
            sub,
            max_new_tokens=max_new_tokens,
            eos_ids=(eos,),
            pad_id=pad,
            temperature=temperature,
        )
        tokens.append(np.asarray(out.tokens))
        lengths.append(np.asarray(out.lengths))
    tokens, lengths = np.concatenate(tokens), np.concatenate(lengths)
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    finished = (lengths > 0) & (last == eos)
    texts = [
        tokenizer.decode(row[: length - int(done)].tolist(), skip_special_tokens=True)
        for row, length, done in zip(tokens, lengths, finished, strict=True)
    ]
    return Samples(index, rows_ids, rows_mask, tokens, lengths, finished, texts)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _response_logprob(graphdef, state, prompt_ids, prompt_mask, tokens, lengths):
    model = nnx.merge(graphdef, state)
    p, t = prompt_ids.shape[1], tokens.shape[1]
    response_mask = jnp.arange(t)[None, :] < lengths[:, None]  # [S, T]
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)  # [S, P + T]
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden = model(ids, positions, mask)[:, p - 1 : p + t - 1]  # predicts the T response slots
    logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)  # [S, T, V]
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(response_mask, picked, 0.0), axis=1)


def response_logprob(model, samples: Samples, batch_rows: int = 4096) -> np.ndarray:
    """log model(y | x) [S] of every sampled response, summed over its tokens (EOS included)."""
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, len(samples.lengths), batch_rows):
        sl = slice(start, start + batch_rows)
        out.append(
            _response_logprob(
                graphdef,
                state,
                jnp.asarray(samples.prompt_ids[sl]),
                jnp.asarray(samples.prompt_mask[sl]),
                jnp.asarray(samples.tokens[sl]),
                jnp.asarray(samples.lengths[sl]),
            )
        )
    return np.asarray(jnp.concatenate(out), np.float64)


def evaluate_model(
    model,
    tokenizer,
    prompts: list[str],
    scorer,
    *,
    reference=None,
    n: int = 16,
    max_new_tokens: int = 32,
    seed: int = 0,
    template: str | None = None,
):
    """Samples N responses per prompt, scores them with `scorer` and, with a `reference` model,
    attaches log pi(y|x) - log pi_ref(y|x) for the KL estimate. Returns (SampleScores, Samples).

    Responses that hit `max_new_tokens` without EOS are scored as they are and counted (logged).
    """
    from rsa_jax.eval.scorers import score_samples

    samples = sample(
        model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, seed=seed, template=template
    )
    unfinished = int((~samples.finished).sum())
    if unfinished:
        log.warning(
            "%d of %d responses reached max_new_tokens=%d without EOS; scored as truncated",
            unfinished,
            len(samples.finished),
            max_new_tokens,
        )
    logratio = None
    if reference is not None:
        logratio = response_logprob(model, samples) - response_logprob(reference, samples)
    row_prompts = [prompts[i] for i in samples.prompt_index]
    scores = score_samples(scorer, row_prompts, samples.texts, samples.prompt_index, logratio)
    return scores, samples
