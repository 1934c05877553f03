"""Prompt formatting, tokenisation with truncation, and the static batch layout.

Dimension legend: B pairs, P prompt slots, R response slots, L = P + R.

Batch layout (what the model, the loss and the train step consume, without reshuffling): rows
[0, B) hold `[prompt | chosen]`, rows [B, 2B) the same prompts with `[prompt | rejected]`; the
prompt is LEFT-padded into slots [0, P) and the response RIGHT-padded into slots [P, L).
  input_ids      int32 [2B, L]  pad id on padding
  attention_mask bool  [2B, L]  True on real tokens
  positions      int32 [2B, L]  cumsum(attention_mask) - 1, 0 on left padding
  labels         int32 [2B, L]  input_ids shifted left by one (last column: pad)
  loss_mask      bool  [2B, L]  True where labels[:, t] is a response token
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rsa_jax.data._config import DataConfig
from rsa_jax.data._sources import PairRecord, Text
from rsa_jax.data._text import TextEncoder


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair after truncation; responses end with EOS."""

    prompt: np.ndarray  # int32 [<= P]
    chosen: np.ndarray  # int32 [1 <= . <= R]
    rejected: np.ndarray  # int32 [1 <= . <= R]

    def longest(self) -> tuple[int, int]:
        return len(self.prompt), max(len(self.chosen), len(self.rejected))


class PairTokenizer:
    """Formats and tokenises `PairRecord`s with a `transformers` tokenizer.

    Prompts: a string prompt goes through `config.template` when one is set, otherwise through the
    tokenizer's chat template as a single user turn (with the generation prompt); a message-list
    prompt always goes through the chat template. Responses (strings; `load_pairs` takes the last
    assistant message of a message list): the text without special tokens, then EOS. Data text that
    spells a special token (`<|im_end|>`) is encoded as plain text; only the template writes
    control tokens. Truncation keeps the END of the prompt (left truncation) and the START of the
    response (right truncation, EOS kept last).
    """

    def __init__(self, tokenizer, config: DataConfig):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; responses must end with EOS")
        if config.template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "data.template is not set and the tokenizer has no chat template: set one"
            )
        self.tokenizer = tokenizer
        self.config = config
        # Data text never becomes a control token (see _text.py): only the template writes them.
        self.text = TextEncoder(tokenizer)
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)

    def prompt_ids(self, prompt: Text, origin: str) -> np.ndarray:
        try:
            ids = self.text.prompt(prompt, self.config.template)
        except ValueError as e:  # e.g. a prompt that spells a token the tokenizer cannot split
            raise ValueError(f"{origin}: the prompt cannot be encoded: {e}") from None
        if not ids:
            raise ValueError(f"{origin}: the prompt tokenises to no tokens")
        return np.asarray(ids[-self.config.max_prompt_len :], np.int32)

    def response_ids(self, response: str) -> np.ndarray:
        ids = self.text.plain(response)[: self.config.max_response_len - 1]
        return np.asarray(ids + [self.eos_id], np.int32)

    def __call__(self, record: PairRecord) -> TokenizedPair:
        return TokenizedPair(
            prompt=self.prompt_ids(record.prompt, record.origin),
            chosen=self.response_ids(record.chosen),
            rejected=self.response_ids(record.rejected),
        )


def _bucket(length: int, buckets: tuple[int, ...], limit: int) -> int:
    fitting = [b for b in buckets if b >= length]
    return min(fitting) if fitting else limit


def batch_shape(pairs: Sequence[TokenizedPair], config: DataConfig) -> tuple[int, int]:
    """(P, R) of a batch: the smallest buckets that fit its longest prompt and response."""
    longest_prompt = max(p.longest()[0] for p in pairs)
    longest_response = max(p.longest()[1] for p in pairs)
    return (
        _bucket(longest_prompt, config.prompt_buckets, config.max_prompt_len),
        _bucket(longest_response, config.response_buckets, config.max_response_len),
    )


def length_key(pair: TokenizedPair, config: DataConfig) -> tuple[int, int, int]:
    """Sort key of length grouping: the pair's (response bucket, prompt bucket, total length),
    so that a batch cut from sorted pairs mostly shares one bucket shape."""
    prompt, response = pair.longest()
    return (
        _bucket(response, config.response_buckets, config.max_response_len),
        _bucket(prompt, config.prompt_buckets, config.max_prompt_len),
        prompt + response,
    )


def collate_rows(
    rows: list[tuple[np.ndarray, np.ndarray]], prompt_len: int, response_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """The batch layout above for any N (prompt, response) rows, P = prompt_len, R = response_len.

    Every array is a per-row function of its own row, so a host's block of rows of the global
    batch is built without the other rows.
    """
    n, length = len(rows), prompt_len + response_len
    input_ids = np.full((n, length), pad_id, np.int32)
    attention = np.zeros((n, length), bool)
    is_response = np.zeros((n, length), bool)
    for row, (prompt, response) in enumerate(rows):
        start = prompt_len - len(prompt)
        input_ids[row, start:prompt_len] = prompt
        input_ids[row, prompt_len : prompt_len + len(response)] = response
        attention[row, start : prompt_len + len(response)] = True
        is_response[row, prompt_len : prompt_len + len(response)] = True
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
    labels = np.concatenate([input_ids[:, 1:], np.full((n, 1), pad_id, np.int32)], axis=1)
    loss_mask = np.concatenate([is_response[:, 1:], np.zeros((n, 1), bool)], axis=1)
    return {
        "input_ids": input_ids,  # [N, L]
        "attention_mask": attention,  # [N, L]
        "positions": positions,  # [N, L]
        "labels": labels,  # [N, L]
        "loss_mask": loss_mask,  # [N, L]
    }


def collate(
    pairs: list[TokenizedPair], prompt_len: int, response_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """The batch layout above for B pairs: rows [0, B) chosen, [B, 2B) rejected; [2B, L]."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    return collate_rows(rows, prompt_len, response_len, pad_id)


def padding_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of the batch's token slots that hold real tokens."""
    return float(batch["attention_mask"].mean())
