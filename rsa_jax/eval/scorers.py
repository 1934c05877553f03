"""One interface for scoring sampled responses: the `Scorer` protocol, loading and validation.

Dimension legend: N samples (one (prompt, response) pair each).

A scorer is any callable `scorer(prompts, responses) -> {"reward": [N], "cost": [N],
"catastrophic": [N] (optional)}` taking two lists of N strings (the i-th prompt is the prompt of
the i-th response, prompts repeat). Without "catastrophic" a sample is catastrophic when its cost
is >= the scorer's `catastrophe_threshold` attribute. Reward models, cost models, rule-based
judges and the synthetic task's exact oracles all fit; batching and devices are the scorer's
business. `load_scorer("package.module:attr")` loads a user-supplied one, `score_samples` calls
it and checks its output into a `SampleScores`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np

from rsa_jax.eval.metrics import SampleScores


@runtime_checkable
class Scorer(Protocol):
    """Scores N (prompt, response) pairs.

    Optional attribute `catastrophe_threshold: float`: used when the output has no
    "catastrophic" entry (catastrophic = cost >= threshold).
    """

    def __call__(self, prompts: list[str], responses: list[str]) -> Mapping[str, Any]:
        """prompts [N], responses [N] -> {"reward": [N] float, "cost": [N] float,
        "catastrophic": [N] bool (optional)}."""
        ...


def scorer_name(scorer: Any) -> str:
    """A readable name for error messages: `module.qualname` of the function or class."""
    target = scorer if callable(scorer) and hasattr(scorer, "__qualname__") else type(scorer)
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", repr(target))
    return f"{module}.{qualname}" if module else qualname


def load_scorer(spec: str) -> Scorer:
    """Import the scorer named by `"package.module:attr"` (attr may be dotted: `Class.factory`).

    The module is looked up in the current working directory first, as `python -m` does, so a
    `my_scorer.py` next to the user works with the `rsa-jax` script too (whose sys.path starts
    at the script's directory, not the working directory).

    A class is instantiated with no arguments; any other callable (a function, an instance) is
    returned as is.

    Raises:
      ValueError: `spec` is not of the form "module:attr".
      ImportError: the module cannot be found (the message names `spec`); an ImportError raised
        while executing the module is re-raised with `spec` in the message.
      AttributeError: the module has no such attribute (the message names `spec`).
      TypeError: the attribute is not callable, or the class cannot be built without arguments.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"scorer spec {spec!r} must look like 'package.module:attr'")
    try:
        with _cwd_on_path():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing_itself = e.name is not None and (
            module_name == e.name or module_name.startswith(e.name + ".")
        )
        if missing_itself:
            raise ImportError(
                f"scorer spec {spec!r}: no module named {e.name!r} (looked up from the "
                f"working directory {os.getcwd()}, then the installed packages)"
            ) from e
        raise ImportError(f"scorer spec {spec!r}: importing {module_name!r} failed: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"scorer spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as e:
            raise TypeError(
                f"scorer spec {spec!r}: cannot build {attr} with no arguments: {e}"
            ) from e
    if not callable(obj):
        raise TypeError(f"scorer spec {spec!r}: {attr} is a {type(obj).__name__}, not callable")
    # A call signature cannot be checked before calling; `score_samples` checks the output.
    return cast(Scorer, obj)


@contextlib.contextmanager
def _cwd_on_path():
    """The working directory first on sys.path for one import (removed afterwards, so it never
    shadows other imports later; a package imported from it keeps its absolute __path__)."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:  # already searched (python -m, an interactive shell)
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def score_samples(
    scorer: Scorer,
    prompts: Sequence[str],
    responses: Sequence[str],
    prompt_index: Sequence[int] | np.ndarray,
    logratio: Sequence[float] | np.ndarray | None = None,
) -> SampleScores:
    """Score N responses with `scorer` and check the result.

    Args:
      scorer: a `Scorer`.
      prompts: [N] the prompt text of each sample.
      responses: [N] the response text of each sample.
      prompt_index: [N] int, the index of each sample's prompt (samples of one prompt share it).
      logratio: [N] float or None, log pi(y|x) - log pi_ref(y|x) per sample.

    Returns:
      SampleScores.

    Raises:
      ValueError: input lengths differ, or the scorer's output is not a mapping with "reward" and
        "cost" [N] finite float arrays (and "catastrophic" [N] bool when present), or it has
        neither "catastrophic" nor a `catastrophe_threshold`; the message names the scorer.
    """
    n = len(responses)
    prompt_index = np.asarray(prompt_index)
    lengths = {"prompts": len(prompts), "responses": n, "prompt_index": prompt_index.shape[0]}
    if logratio is not None:
        logratio = np.asarray(logratio)
        lengths["logratio"] = logratio.shape[0]
    if len(set(lengths.values())) != 1:
        raise ValueError(f"score_samples: inputs have different lengths {lengths}")
    name = scorer_name(scorer)
    output = scorer(list(prompts), list(responses))
    if not isinstance(output, Mapping):
        raise ValueError(f"scorer {name} returned a {type(output).__name__}, expected a dict")
    arrays = {}
    for key in ("reward", "cost"):
        if key not in output:
            raise ValueError(f"scorer {name} returned no {key!r} (keys: {sorted(output)})")
        array = np.asarray(output[key])
        if array.dtype.kind not in "iuf":
            raise ValueError(f"scorer {name}: {key!r} has dtype {array.dtype}, expected float")
        array = array.astype(np.float64)
        if array.shape != (n,):
            raise ValueError(f"scorer {name}: {key!r} has shape {array.shape}, expected ({n},)")
        if not np.isfinite(array).all():
            bad = int(np.argmax(~np.isfinite(array)))
            raise ValueError(f"scorer {name}: {key!r} has a non-finite value at sample {bad}")
        arrays[key] = array
    if "catastrophic" in output:
        catastrophic = np.asarray(output["catastrophic"])
        if catastrophic.dtype != np.bool_ or catastrophic.shape != (n,):
            raise ValueError(
                f"scorer {name}: 'catastrophic' must be a ({n},) bool array, got "
                f"{catastrophic.dtype} {catastrophic.shape}"
            )
    else:
        threshold = getattr(scorer, "catastrophe_threshold", None)
        if threshold is None:
            raise ValueError(
                f"scorer {name} returned no 'catastrophic' and has no catastrophe_threshold"
            )
        catastrophic = arrays["cost"] >= float(threshold)
    try:
        return SampleScores(
            prompt=prompt_index,
            reward=arrays["reward"],
            cost=arrays["cost"],
            catastrophic=catastrophic,
            logratio=logratio,
        )
    except ValueError as e:
        raise ValueError(f"scoring with {name}: {e}") from e
