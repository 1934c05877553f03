"""How many rows a sampling or scoring batch holds: a memory budget over the bytes one row needs.

Dimension legend: L layers, H query heads, K key/value heads, E head dim, D hidden, F MLP width,
V vocabulary, P prompt slots, N new-token slots, T response slots, S = P + N cache slots.

Bytes of one row, from the model config (c = the compute dtype's item size, float32 = 4):

  sampling  KV cache            2 (keys, values) * 2 (the loop's updated copy) * L * S * K * E * c
            prefill attention   2 (scores, weights) * H * P * S * 4
            prefill activations P * (4 D + 3 F) * 4
            sampler             8 * V * 4  (logits, scaled, sorted, order, probs, cumulative sum,
                                            log-softmax, mask: the [B, V] arrays of one step)
  scoring   logits              2 (logits, log-softmax) * T * V * 4
            attention           2 * H * (P + T)^2 * 4
            activations         (P + T) * (4 D + 3 F) * 4

These are upper estimates of what XLA keeps live at the peak (it fuses some of them away); the
parameters themselves are not counted: the budget is what is left for activations. A batch is a
multiple of the row shards (each device holds `rows / shards` rows), so the budget is per device.
"""

from __future__ import annotations

import jax

# Without a device memory limit to read (CPU), the host memory evaluation may use, in bytes,
# shared by the local devices.
CPU_BUDGET = 2 << 30
# The fraction of a device's free memory (limit - in use) that a batch may take.
DEVICE_FRACTION = 0.5


def _activations(llama, length: int) -> int:
    return length * (4 * llama.hidden_size + 3 * llama.intermediate_size) * 4


def sampling_bytes_per_row(
    llama, prompt_len: int, new_tokens: int, compute_itemsize: int = 4
) -> int:
    """Bytes one sampled row needs (module docstring): KV cache + sampler logits + prefill."""
    c = int(compute_itemsize)
    slots = prompt_len + new_tokens
    layers, kv, e = llama.num_hidden_layers, llama.num_key_value_heads, llama.head_dim
    cache = 2 * 2 * layers * slots * kv * e * c
    attention = 2 * llama.num_attention_heads * prompt_len * slots * 4
    sampler = 8 * llama.vocab_size * 4
    return cache + attention + sampler + _activations(llama, prompt_len)


def scoring_bytes_per_row(llama, prompt_len: int, response_len: int) -> int:
    """Bytes one teacher-forced row needs (module docstring): logits + attention + activations."""
    length = prompt_len + response_len
    logits = 2 * response_len * llama.vocab_size * 4
    attention = 2 * llama.num_attention_heads * length * length * 4
    return logits + attention + _activations(llama, length)


def default_memory_budget(devices=None) -> int:
    """Bytes per device a batch may use: half the free memory of the most loaded device when the
    backend reports it (GPU, TPU), else `CPU_BUDGET` shared by the local devices."""
    devices = jax.local_devices() if devices is None else devices
    free = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if free:
        return max(1, int(DEVICE_FRACTION * min(free)))
    return max(1, CPU_BUDGET // max(1, len(devices)))


def rows_per_batch(bytes_per_row: int, total_rows: int, shards: int, budget: int) -> int:
    """The rows of one batch: as many as `budget` bytes per device hold, a multiple of `shards`,
    at least `shards` (one row per device) and no more than `total_rows` rounded up to one.

    Args:
      bytes_per_row: one row's bytes (`sampling_bytes_per_row`, `scoring_bytes_per_row`).
      total_rows: rows to process in all.
      shards: row shards (devices the rows are split over).
      budget: bytes per device.
    """
    if bytes_per_row <= 0 or shards <= 0 or budget <= 0:
        raise ValueError(
            f"rows_per_batch: bytes_per_row={bytes_per_row}, shards={shards} and "
            f"budget={budget} must be positive"
        )
    per_device = max(1, budget // bytes_per_row)
    needed = -(-max(1, total_rows) // shards)  # rows per device for everything in one batch
    return shards * min(per_device, needed)
