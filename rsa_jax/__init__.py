"""rsa_jax: Risk-aware Stepwise Alignment (RSA) and its baselines in JAX/Flax."""

__version__ = "0.1.0"
