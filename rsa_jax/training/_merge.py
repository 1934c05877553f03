"""Policies from anywhere, and model merging (RSA(P) / P-SACPO weight averages).

A policy source is a run directory (its final policy), a run directory at a stage
(`RUN@0` or `RUN@helpfulness`: the policy that stage ended with), or a Hugging Face model
directory. `load_source` returns the flat parameters, a builder of the NNX model and the tokenizer,
so `rsa-jax export` and `rsa-jax merge` treat the three alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

from rsa_jax.models import Llama, LlamaConfig, load_hf, nest_params
from rsa_jax.training._rundir import resolve_source


@dataclasses.dataclass
class Policy:
    params: dict  # flat {"layers/0/mlp/up/kernel": array}
    build: Callable[[dict], Llama]  # params -> the NNX model
    tokenizer: Any
    llama: LlamaConfig
    source: str


def load_source(source: str) -> Policy:
    """The policy of a run directory (optionally `@stage`) or of a Hugging Face directory."""
    from rsa_jax.training._trainer import load_policy

    resolved = resolve_source(source)
    if resolved.kind == "run":
        engine, params = load_policy(resolved.path, stage=resolved.stage)
        return Policy(params, engine.model.module, engine.tokenizer, engine.model.llama, source)
    path = resolved.path
    from transformers import AutoTokenizer

    model = load_hf(path)
    graphdef, state = nnx.split(model)
    params = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state)}

    def build(flat: dict) -> Llama:
        return nnx.merge(graphdef, nest_params(flat))

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return Policy(params, build, tokenizer, model.config, source)


def merge_params(a: dict, b: dict, q: float) -> dict:
    """theta = (1 - q) a + q b, leaf by leaf (flat parameter dicts with the same keys/shapes)."""
    if not 0 <= q <= 1:
        raise ValueError(f"merge ratio q must lie in [0, 1], got {q}")
    if set(a) != set(b):
        raise ValueError(f"the policies hold different parameters: {sorted(set(a) ^ set(b))}")
    out = {}
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"parameter {k}: shapes {a[k].shape} and {b[k].shape} differ")
        out[k] = (1 - q) * a[k] + q * b[k]
    return out


def merge_sources(first: str, second: str, q: float) -> Policy:
    """(1 - q) first + q second, with the first source's tokenizer; both must share the
    architecture."""
    a, b = load_source(first), load_source(second)
    if a.llama != b.llama:
        raise ValueError(f"merge: {first} and {second} have different model configurations")
    return dataclasses.replace(a, params=merge_params(a.params, b.params, q), source=f"merge({q})")
