"""Test support: slow NumPy references of every kernel (`reference`) and random cases (`cases`)."""

from rsa_jax.testing import cases, reference

__all__ = ["cases", "reference"]
