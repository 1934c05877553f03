"""The evaluation driver: N responses per prompt from the jitted KV-cache generator,
teacher-forced log-probabilities of those responses under the policy and a reference, and their
scores; on one device or on a mesh (`Placement`), in batches sized by a memory budget.

Dimension legend: B prompts, N samples per prompt, R = B * N sampled rows, P prompt slots,
T new-token slots, V vocabulary.

Row r (prompt r // N) samples with the key `fold_in(key(seed), r)`: its response depends on the
seed and r only, so the same seed gives the same samples whatever the batch size, the mesh or the
number of devices. Every batch has the same shape (the last one is filled up with copies of its
first row, dropped afterwards), so sampling compiles once and scoring once per model.

KL(pi || pi_ref) is estimated from the samples as the mean of log pi(y|x) - log pi_ref(y|x) over
responses y ~ pi(.|x): both log-probabilities are summed over the response tokens (EOS included)
and computed the same way, by one teacher-forced forward pass of each model in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsa_jax.data import DataConfig, PairTokenizer
from rsa_jax.eval._budget import (
    default_memory_budget,
    rows_per_batch,
    sampling_bytes_per_row,
    scoring_bytes_per_row,
)
from rsa_jax.eval._placement import Placement, placement_of, to_host
from rsa_jax.generate import generate, generate_call, place_rows

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Samples:
    """R = B * N sampled responses, row r answering prompt `prompt_index[r]`."""

    prompt_index: np.ndarray  # int [R]
    prompt_ids: np.ndarray  # int32 [R, P], left-padded
    prompt_mask: np.ndarray  # bool [R, P]
    tokens: np.ndarray  # int32 [R, T], pad after EOS
    lengths: np.ndarray  # int32 [R], tokens generated, EOS included
    finished: np.ndarray  # bool [R], the response ended with EOS within T tokens
    texts: list[str]  # decoded responses without EOS

    @property
    def sample_index(self) -> np.ndarray:
        """int [R]: the row's number among the samples of its prompt (0..N-1)."""
        out = np.zeros(len(self.prompt_index), np.int64)
        seen: dict[int, int] = {}
        for r, p in enumerate(self.prompt_index.tolist()):
            out[r] = seen.get(p, 0)
            seen[p] = out[r] + 1
        return out


# The most prompt tokens a sampled row keeps (`encode_prompts`): the widest prompt batch, the
# sampler's P.
PROMPT_SLOTS = 128


def encode_prompts(
    tokenizer, prompts: list[str], template: str | None, max_prompt_len: int = PROMPT_SLOTS
):
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


def _batches(total: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(rows kept, row indices [size]) per batch; the last batch is filled up with copies of its
    first row so every batch has one shape."""
    for start in range(0, total, size):
        index = np.arange(start, min(start + size, total))
        kept = len(index)
        yield kept, np.concatenate([index, np.full(size - kept, start, index.dtype)])


def _batch_rows(placement, bytes_per_row, total, memory_budget, batch_rows) -> int:
    shards = 1 if placement is None else placement.row_shards
    if batch_rows is not None:
        if batch_rows < 1 or batch_rows % shards:
            raise ValueError(f"batch_rows={batch_rows} must be a positive multiple of {shards}")
        return batch_rows
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    return rows_per_batch(bytes_per_row, total, shards, budget)


def sampling_rows(
    model,
    placement: Placement | None,
    prompt_len: int,
    max_new_tokens: int,
    total_rows: int,
    memory_budget: int | None = None,
    batch_rows: int | None = None,
) -> int:
    """The rows of one `sample` batch: `batch_rows`, else as many as `memory_budget` bytes per
    device hold (`sampling_bytes_per_row`; default `default_memory_budget()`), a multiple of the
    row shards, no more than `total_rows` need."""
    itemsize = jnp.dtype(model.compute_dtype).itemsize
    per_row = sampling_bytes_per_row(model.config, prompt_len, max_new_tokens, itemsize)
    return _batch_rows(placement, per_row, total_rows, memory_budget, batch_rows)


def sampling_shardings(model, placement: Placement | None, rows: int, slots: int):
    """Where `sample` puts a batch's rows and KV cache (None: one device, no constraint)."""
    if placement is None:
        return None
    return placement.generate_shardings(rows, slots, model.config)


def sampling_call(
    model, *, rows: int, prompt_len: int, max_new_tokens: int, placement: Placement | None
):
    """The jitted sampler call `sample` makes for one batch, from shapes only:
    `(fn, args, static)` (`rsa_jax.generate.generate_call`), `fn.lower(*args, **static)` the
    program evaluation runs. `model` may be abstract (`nnx.eval_shape`, or ShapeDtypeStruct
    parameters with shardings): nothing is allocated."""
    graphdef, state = nnx.split(model)
    shardings = sampling_shardings(model, placement, rows, prompt_len + max_new_tokens)
    return generate_call(
        graphdef,
        state,
        rows=rows,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        shardings=shardings,
    )


def _progress(total: int, desc: str, progress: bool | None):
    """A tqdm bar over rows; `progress` None: shown on a terminal only (tqdm's disable=None)."""
    from tqdm.auto import tqdm

    if progress is False or jax.process_index() != 0:
        disable = True
    else:
        disable = None if progress is None else False
    return tqdm(total=total, desc=desc, unit="row", disable=disable, leave=False)


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
    placement: Placement | None = None,
    memory_budget: int | None = None,
    batch_rows: int | None = None,
    progress: bool | None = None,
) -> Samples:
    """N samples per prompt at `temperature` (1.0: from the policy itself, no truncation).

    Args:
      model: a `Llama`, on one device or sharded on a mesh.
      placement: the mesh and rules to split rows over (default: `placement_of(model)`, the mesh
        its parameters are on; None there: one device).
      memory_budget: bytes per device for one batch (`rsa_jax.eval._budget`; default
        `default_memory_budget()`); `batch_rows` fixes the rows per batch instead.
      progress: a tqdm bar over rows (None: on a terminal only).
    """
    placement = placement_of(model) if placement is None else placement
    ids, mask = encode_prompts(tokenizer, prompts, template)
    index = np.repeat(np.arange(len(prompts)), n)
    rows_ids, rows_mask = ids[index], mask[index]
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    size = sampling_rows(
        model, placement, ids.shape[1], max_new_tokens, len(index), memory_budget, batch_rows
    )
    shardings = sampling_shardings(model, placement, size, ids.shape[1] + max_new_tokens)
    key = jax.random.key(seed)
    tokens = np.empty((len(index), max_new_tokens), np.int32)
    lengths = np.empty(len(index), np.int32)
    with _progress(len(index), "sampling", progress) as bar:
        for kept, rows in _batches(len(index), size):
            out = generate(
                model,
                rows_ids[rows],
                rows_mask[rows],
                key,
                max_new_tokens=max_new_tokens,
                eos_ids=(eos,),
                pad_id=pad,
                temperature=temperature,
                row_ids=rows,
                shardings=shardings,
            )
            tokens[rows[:kept]] = to_host(out.tokens)[:kept]
            lengths[rows[:kept]] = to_host(out.lengths)[:kept]
            bar.update(kept)
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
    response_mask = jnp.arange(t)[None, :] < lengths[:, None]  # [R, T]
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)  # [R, P + T]
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden = model(ids, positions, mask)[:, p - 1 : p + t - 1]  # predicts the T response slots
    logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)  # [R, T, V]
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(response_mask, picked, 0.0), axis=1)


def response_logprob(
    model,
    samples: Samples,
    *,
    placement: Placement | None = None,
    memory_budget: int | None = None,
    batch_rows: int | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """log model(y | x) [R] of every sampled response, summed over its tokens (EOS included).

    Rows are split over `placement`'s batch axes (default: the mesh of the model's parameters)
    in batches sized by `memory_budget` bytes per device, as in `sample`.
    """
    placement = placement_of(model) if placement is None else placement
    total = len(samples.lengths)
    per_row = scoring_bytes_per_row(
        model.config, samples.prompt_ids.shape[1], samples.tokens.shape[1]
    )
    size = _batch_rows(placement, per_row, total, memory_budget, batch_rows)
    rows_sharding = None if placement is None else placement.rows()
    graphdef, state = nnx.split(model)
    out = np.empty(total, np.float64)
    with _progress(total, "scoring", progress) as bar:
        for kept, rows in _batches(total, size):
            logprob = _response_logprob(
                graphdef,
                state,
                place_rows(samples.prompt_ids[rows], rows_sharding),
                place_rows(samples.prompt_mask[rows], rows_sharding),
                place_rows(samples.tokens[rows], rows_sharding),
                place_rows(samples.lengths[rows], rows_sharding),
            )
            out[rows[:kept]] = to_host(logprob)[:kept]
            bar.update(kept)
    return out


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
    memory_budget: int | None = None,
    progress: bool | None = None,
):
    """Samples N responses per prompt, scores them with `scorer` and, with a `reference` model,
    attaches log pi(y|x) - log pi_ref(y|x) for the KL estimate. Returns (SampleScores, Samples).

    Each model runs on the mesh its parameters are on (`load_model` puts them there).
    Responses that hit `max_new_tokens` without EOS are scored as they are and counted (logged).
    """
    from rsa_jax.eval.scorers import score_samples

    budget: dict[str, Any] = dict(memory_budget=memory_budget, progress=progress)
    samples = sample(
        model,
        tokenizer,
        prompts,
        n=n,
        max_new_tokens=max_new_tokens,
        seed=seed,
        template=template,
        **budget,
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
        logratio = response_logprob(model, samples, **budget) - response_logprob(
            reference, samples, **budget
        )
    row_prompts = [prompts[i] for i in samples.prompt_index]
    scores = score_samples(scorer, row_prompts, samples.texts, samples.prompt_index, logratio)
    return scores, samples
