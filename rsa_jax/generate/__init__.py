"""Jitted batched sampling with a KV cache: `generate(model, prompt_ids, prompt_mask, key, ...)`."""

from rsa_jax.generate._sampling import Cache, Generation, generate

__all__ = ["Cache", "Generation", "generate"]
