"""What a pair loss is made of, typed: the static kernel choice and the traced hyperparameters.

`Kernel` (loss, risk, version, split_vocab) selects the compiled program: it is static, hashable
and checked against the registries `LOSSES` and `RISKS`, so it can key a cache of jitted steps.
`LossHyper` (beta, alpha, mu, gamma, and `tail` derived from mu) is a pytree of float32 scalars:
changing it never recompiles, and a stack of them can be vmapped over. Every default of a loss
hyperparameter is written here once (`LossHyper()`); the kernels and the config read it.

    >>> import jax, jax.numpy as jnp
    >>> from rsa_jax.losses import Kernel, LossHyper, logits_pair_loss
    >>> kernel = Kernel(loss="ra_dpo", risk="erm", version=2)
    >>> hyper = LossHyper.create(beta=0.05, mu=2.0)
    >>> kw = {**kernel.kwargs(), **hyper.kwargs()}
    >>> pl, rl = jax.random.normal(jax.random.key(0), (2, 2, 4, 8))  # [2B, T, V], B = 1
    >>> labels, mask = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool)
    >>> losses, metrics = logits_pair_loss(pl, rl, labels, mask, **kw)
    >>> losses.shape
    (1,)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from rsa_jax.losses._preference import LOSSES
from rsa_jax.losses._risk import MU_DOMAIN, RISKS, quantile_tail

VERSIONS = (1, 2)
# Token chunk of the fused head (`fused_pair_loss`): the logits of this many response tokens
# of every row are alive at once.
DEFAULT_CHUNK_SIZE = 64


class KernelError(ValueError):
    """A kernel choice or hyperparameter outside its registry or domain; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The static choice of a pair loss: one compiled program per distinct Kernel."""

    # Pair loss by name (`LOSSES`): dpo, tdpo or ra_dpo (the RSA stage loss).
    loss: str = "ra_dpo"
    # One-step risk functional by name (`RISKS`): cvar_reference, cvar, erm or kl.
    risk: str = "cvar_reference"
    # 1: the chosen side's risk term takes gradient; 2: stop-gradient on it, scaled by alpha.
    version: int = 1
    # Quantile per vocabulary half, as the public Ra-DPO code does (cvar_reference only).
    split_vocab: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise KernelError("loss", f"unknown loss {self.loss!r}; choose one of {sorted(LOSSES)}")
        if self.risk not in RISKS:
            raise KernelError("risk", f"unknown risk {self.risk!r}; choose one of {sorted(RISKS)}")
        if self.version not in VERSIONS:
            raise KernelError("version", f"version must be 1 or 2, got {self.version!r}")

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def label(self) -> str:
        return f"{self.loss}/{self.risk}/v{self.version}" + (
            "" if self.split_vocab else "/whole-vocab"
        )


def check_mu(risk: str, mu) -> None:
    """Raises KernelError unless `lower < mu <= upper` for the functional's domain (`MU_DOMAIN`)."""
    lower, upper = MU_DOMAIN[risk]
    if not lower < float(mu) <= upper:
        raise KernelError("mu", f"risk {risk!r} needs {lower} < mu <= {upper}, got mu={mu}")


class LossHyper(NamedTuple):
    """Traced loss hyperparameters (a pytree of float32 scalars, or [K] stacks under vmap)."""

    # Temperature of the pair logit (the KL-regularisation strength).
    beta: Any = 0.1
    # Weight of the risk difference in version 2 (ignored by version 1 and by dpo).
    alpha: Any = 0.5
    # Risk parameter: the CVaR level (upper-tail mass) or the ERM coefficient.
    mu: Any = 0.95
    # Discount of the nested risk recursion (1: the risk is the masked sum over tokens).
    gamma: Any = 1.0
    # float32 `1 - mu` rounded from float64 as torch.quantile ranks it (derived: `create`).
    tail: Any = None

    @classmethod
    def create(cls, risk: str | None = None, **values) -> LossHyper:
        """float32 scalars from Python numbers, defaults for the rest, `tail` derived from mu.

        With `risk`, mu is checked against that functional's domain. Unknown names raise.
        """
        unknown = set(values) - set(cls._fields[:-1])
        if unknown:
            raise TypeError(f"LossHyper: unknown hyperparameter(s) {sorted(unknown)}")
        full = {**DEFAULTS._asdict(), **values}
        full.pop("tail")
        if risk is not None:
            check_mu(risk, full["mu"])
        # 1 - mu on the host in float64, then float32 (cvar_reference's torch-exact ranks).
        return cls(**{k: np.float32(v) for k, v in full.items()}, tail=quantile_tail(full["mu"]))

    def kwargs(self) -> dict[str, Any]:
        return self._asdict()


DEFAULTS = LossHyper()
TRACED_NAMES = LossHyper._fields[:-1]  # what a user sets; `tail` is derived
