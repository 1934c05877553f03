"""Batch sizes from a memory budget: the bytes-per-row estimates bound what XLA allocates, and
rows per batch respect the budget, the row shards and the total."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from rsa_jax.eval import (
    default_memory_budget,
    rows_per_batch,
    sampling_bytes_per_row,
    scoring_bytes_per_row,
)
from rsa_jax.models import Llama, LlamaConfig, tiny_config

# The cases of each grid that the default suite runs; `make test-slow` runs every case
# (tests/conftest.py marks the others slow).
DEFAULT_CASES = {
    "test_estimates_bound_the_compiled_temporaries": ["8-16-32"],
}

CONFIG = tiny_config(vocab_size=512, max_position_embeddings=256)


@pytest.mark.parametrize("rows, prompt_len, new_tokens", [(8, 16, 32), (32, 64, 64)])
def test_estimates_bound_the_compiled_temporaries(rows, prompt_len, new_tokens):
    # The jitted programs are private; compiled here only to read XLA's memory analysis.
    from rsa_jax.eval._evaluate import _response_logprob
    from rsa_jax.generate._sampling import _generate

    graphdef, state = nnx.split(Llama(CONFIG, rngs=nnx.Rngs(0)))
    ids, mask = jnp.ones((rows, prompt_len), jnp.int32), jnp.ones((rows, prompt_len), bool)
    scalars = (jnp.float32(1), jnp.int32(0), jnp.float32(1), jnp.asarray([2]), jnp.int32(0))
    sampler = _generate.lower(
        graphdef, state, ids, mask, jax.random.key(0), jnp.arange(rows), *scalars,
        max_new_tokens=new_tokens, shardings=None,
    ).compile()  # fmt: skip
    tokens = jnp.ones((rows, new_tokens), jnp.int32)
    lengths = jnp.full((rows,), new_tokens)
    scorer = _response_logprob.lower(graphdef, state, ids, mask, tokens, lengths).compile()
    for compiled, per_row in (
        (sampler, sampling_bytes_per_row(CONFIG, prompt_len, new_tokens)),
        (scorer, scoring_bytes_per_row(CONFIG, prompt_len, new_tokens)),
    ):
        temp = compiled.memory_analysis().temp_size_in_bytes
        # An upper estimate, but not a wild one (a budget would waste most of the memory).
        assert temp <= rows * per_row <= 4 * temp, (temp, rows * per_row)


def test_kv_cache_term_grows_with_the_slots_as_the_cache_does():
    llama = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    one_more = sampling_bytes_per_row(llama, 128, 65, 2) - sampling_bytes_per_row(llama, 128, 64, 2)
    cache_slot = 2 * 2 * 30 * 3 * 64 * 2  # keys + values, and the loop's copy, bfloat16
    attention_column = 2 * 9 * 128 * 4  # prefill scores + weights over one more slot
    assert one_more == cache_slot + attention_column
    longer = scoring_bytes_per_row(llama, 128, 65) - scoring_bytes_per_row(llama, 128, 64)
    assert longer >= 2 * 49152 * 4  # one more position of float32 logits and log-softmax


@pytest.mark.parametrize("shards", [1, 4, 8])
@pytest.mark.parametrize("budget_rows", [0.5, 1, 3, 1000])
def test_rows_per_batch(shards, budget_rows):
    per_row, total = 1000, 37
    rows = rows_per_batch(per_row, total, shards, int(budget_rows * per_row))
    assert rows % shards == 0 and rows >= shards
    assert rows <= max(shards, -(-total // shards) * shards)  # never more than everything
    per_device = rows // shards
    assert per_device == 1 or per_device * per_row <= budget_rows * per_row
    if budget_rows == 3:
        assert rows == 3 * shards or rows == -(-total // shards) * shards


def test_rows_per_batch_rejects_nonsense():
    with pytest.raises(ValueError, match="budget=0"):
        rows_per_batch(10, 5, 1, 0)


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_default_budget_reads_free_device_memory_or_splits_the_cpu_budget():
    from rsa_jax.eval._budget import CPU_BUDGET

    devices = [
        _Device({"bytes_limit": 100, "bytes_in_use": 20}),
        _Device({"bytes_limit": 100, "bytes_in_use": 60}),
    ]
    assert default_memory_budget(devices) == 20  # half the free memory of the fuller device
    assert default_memory_budget([_Device(None)] * 4) == CPU_BUDGET // 4
