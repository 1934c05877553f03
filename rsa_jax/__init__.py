"""rsa_jax: Risk-aware Stepwise Alignment (RSA) and its baselines in JAX/Flax.

The names a user starts from; everything else lives in the subpackages (`rsa_jax.losses`,
`models`, `generate`, `data`, `training`, `eval`, `sweep`, `tasks`).

    >>> import rsa_jax
    >>> config = rsa_jax.load_config("configs/tiny.yaml", ["stages.1.beta=0.05"])
    >>> config.stages[1].beta
    0.05

The training entry points are imported on first use, so `import rsa_jax` stays light (no JAX
until a name that needs it is touched).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ returns, for type checkers
    from rsa_jax import data, eval, generate, losses, models, sweep, tasks, training
    from rsa_jax.config import Config, ConfigError, load_config
    from rsa_jax.training import Engine, load_policy, train

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily by __getattr__.
_EXPORTS = {
    "Config": "rsa_jax.config",
    "ConfigError": "rsa_jax.config",
    "load_config": "rsa_jax.config",
    "train": "rsa_jax.training",
    "load_policy": "rsa_jax.training",
    "Engine": "rsa_jax.training",
}
_SUBPACKAGES = ("losses", "models", "generate", "data", "training", "eval", "sweep", "tasks")

__all__ = [  # _EXPORTS and _SUBPACKAGES, spelled out for type checkers
    "Config",
    "ConfigError",
    "Engine",
    "__version__",
    "data",
    "eval",
    "generate",
    "load_config",
    "load_policy",
    "losses",
    "models",
    "sweep",
    "tasks",
    "train",
    "training",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"rsa_jax.{name}")
    raise AttributeError(f"module 'rsa_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
