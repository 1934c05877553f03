"""Jitted batched sampling with a KV cache: `generate(model, prompt_ids, prompt_mask, key, ...)`,
on one device or on a mesh (`Shardings`, `place_rows`), lowered from shapes only by
`generate_call`; and text in, text out:
`generate_text(model, tokenizer, prompts)` (formatting, padding, masks and EOS handled inside)."""

from rsa_jax.generate._sampling import (
    Cache,
    Generation,
    Shardings,
    generate,
    generate_call,
    place_rows,
)
from rsa_jax.generate._text import (
    BATCH_SIZE,
    MAX_NEW_TOKENS,
    MAX_PROMPT_LEN,
    TEMPERATURE,
    TOP_P,
    Completion,
    encode_prompt,
    end_ids,
    generate_text,
)

__all__ = [
    "BATCH_SIZE",
    "MAX_NEW_TOKENS",
    "MAX_PROMPT_LEN",
    "TEMPERATURE",
    "TOP_P",
    "Cache",
    "Completion",
    "Generation",
    "Shardings",
    "encode_prompt",
    "end_ids",
    "generate",
    "generate_call",
    "generate_text",
    "place_rows",
]
