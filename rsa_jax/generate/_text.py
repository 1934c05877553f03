"""Text in, text out: `generate_text(model, tokenizer, prompts)` formats each prompt the way
training did (a `{prompt}` template, or the tokenizer's chat template), tokenizes, left-pads,
builds the mask, samples with the KV cache (`generate`), stops at the end-of-sequence ids and
decodes.

Dimension legend: R rows (prompts x samples), B rows per batch, P prompt slots, N new tokens.

Row r (prompt r // n, sample r % n) samples with `fold_in(key(seed), r)`, as `rsa_jax.eval` does:
its text depends on the seed, its prompt and r only, not on the batch size. Every batch has the
same number of rows (the last is filled up with copies of its first row, dropped afterwards) and a
prompt width rounded up to a multiple of `PROMPT_ROUNDING`, so a few prompt lengths share one
compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from rsa_jax.data import TextEncoder
from rsa_jax.generate._sampling import generate

# Defaults of `generate_text` and `rsa-jax generate` (one place, so the two agree).
TEMPERATURE = 0.7
TOP_P = 0.95
MAX_NEW_TOKENS = 256
MAX_PROMPT_LEN = 1024
BATCH_SIZE = 32
PROMPT_ROUNDING = 16  # prompt slots are padded to a multiple of this: fewer compiled shapes


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled answer: `text` is decoded without special tokens and without the final EOS."""

    prompt_index: int
    sample_index: int
    prompt: str | list
    text: str
    tokens: list[int]  # the generated ids, EOS included when `finished`
    finished: bool  # ended with an end-of-sequence id (False: stopped at max_new_tokens)


def end_ids(tokenizer, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The ids that end a row: the tokenizer's EOS and `extra` (e.g. a generation_config's)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids += [int(i) for i in extra if int(i) not in ids]
    if not ids:
        raise ValueError("the tokenizer has no eos_token and no end ids were given")
    return tuple(ids)


def encode_prompt(
    text: TextEncoder, prompt: str | list, template: str | None, max_prompt_len: int
) -> np.ndarray:
    """A prompt's ids [<= max_prompt_len], formatted as in training and truncated from the left
    (the end of the prompt, where the answer starts, is kept)."""
    if template is not None and "{prompt}" not in template:
        raise ValueError(f"template must contain '{{prompt}}', got {template!r}")
    ids = text.prompt(prompt, template)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} tokenises to no tokens")
    return np.asarray(ids[-max_prompt_len:], np.int32)


def _left_pad(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = -(-max(len(r) for r in rows) // PROMPT_ROUNDING) * PROMPT_ROUNDING
    ids = np.full((len(rows), width), pad_id, np.int32)  # [B, P]
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = True
    return ids, mask


def generate_text(
    model,
    tokenizer,
    prompts: str | Sequence[str | list],
    *,
    template: str | None = None,
    n: int = 1,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = 0,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    max_prompt_len: int = MAX_PROMPT_LEN,
    batch_size: int = BATCH_SIZE,
    on_completion: Callable[[Completion], None] | None = None,
) -> list[Completion]:
    """`n` sampled answers to each prompt, in prompt order.

    Args:
      model: a `rsa_jax.models.Llama` (e.g. `rsa_jax.eval.load_model(path)[0]`).
      tokenizer: its `transformers` tokenizer.
      prompts: one string, or a list of strings or chat-message lists.
      template: a `{prompt}` template (a run's `data.template`); None: the chat template.
      n: samples per prompt. max_new_tokens: the most tokens per answer (EOS included).
      temperature: 0 is greedy; top_p: nucleus mass; top_k: keep the k most likely (0: off).
      seed: row r samples with `fold_in(key(seed), r)`.
      eos_ids: ids that end an answer (default: the tokenizer's EOS).
      max_prompt_len: longer prompts keep their last tokens.
      batch_size: rows sampled at once (the last batch is filled up; fewer rows: one batch).
      on_completion: called with each completion as soon as its batch is done (streaming).
    Returns:
      list of `Completion`, prompt-major (prompt 0's n samples first).

    Example (a tiny random model, so the text is noise):

    >>> from rsa_jax.data import train_bpe_tokenizer
    >>> from rsa_jax.models import Llama, tiny_config
    >>> from flax import nnx
    >>> tok = train_bpe_tokenizer()
    >>> model = Llama(tiny_config(vocab_size=len(tok)), rngs=nnx.Rngs(0))
    >>> [c] = generate_text(model, tok, "hi", template="Q: {prompt} A:", max_new_tokens=4)
    >>> (c.prompt_index, c.sample_index, len(c.tokens) <= 4)
    (0, 0, True)
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts")
    counts = dict(n=n, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for name, value in {**counts, "max_prompt_len": max_prompt_len}.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    ends = end_ids(tokenizer) if eos_ids is None else tuple(int(i) for i in eos_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    encoder = TextEncoder(tokenizer)
    encoded = []
    for i, prompt in enumerate(prompts):
        try:
            encoded.append(encode_prompt(encoder, prompt, template, max_prompt_len))
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    total = len(prompts) * n
    size = min(batch_size, total)
    key = jax.random.key(seed)
    out: list[Completion] = []
    for start in range(0, total, size):
        rows = np.arange(start, min(start + size, total))
        kept = len(rows)
        rows = np.concatenate([rows, np.full(size - kept, start, rows.dtype)])
        ids, mask = _left_pad([encoded[r // n] for r in rows], pad)
        result = generate(
            model,
            ids,
            mask,
            key,
            max_new_tokens=max_new_tokens,
            eos_ids=ends,
            pad_id=int(pad),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            row_ids=rows,
        )
        tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        for j in range(kept):
            r = int(rows[j])
            row = tokens[j, : lengths[j]].tolist()
            finished = bool(row) and row[-1] in ends
            text = tokenizer.decode(row[: len(row) - finished], skip_special_tokens=True)
            completion = Completion(r // n, r % n, prompts[r // n], text, row, finished)
            out.append(completion)
            if on_completion is not None:
                on_completion(completion)
    return out
