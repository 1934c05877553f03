"""Jitted batched sampling with a KV cache: `generate(model, prompt_ids, prompt_mask, key, ...)`,
on one device or on a mesh (`Shardings`, `place_rows`)."""

from rsa_jax.generate._sampling import Cache, Generation, Shardings, generate, place_rows

__all__ = ["Cache", "Generation", "Shardings", "generate", "place_rows"]
