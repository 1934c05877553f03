"""One weight projection of the Llama: `einsum(x, W)`, W optionally stored quantized, plus an
optional LoRA delta `(alpha / rank) (x A) B`.

Every matmul against a weight matrix (q, k, v, o, gate, up, down) goes through `project`, so the
same model code runs a float base, a quantized base (int8/nf4 `qwix.QArray`, dequantized right
before its own matmul: only one layer's float weight is live at a time, and inside the layer
scan only that layer's) and a LoRA model (adapters `<name>_lora_a`, `<name>_lora_b` next to the
weight, scale `lora_scale` on the module; with `lora_dropout` > 0 and a `lora_key` variable on
the module, dropout on the adapter's input, as PEFT).

Why the LoRA delta is written here and not by qwix's `LoraProvider` (qwix 0.1.8): qwix finds a
weight by intercepting `jnp.einsum` during the call and matching the operand back to a module
attribute. On this model it (1) fails for a quantized base, since our weights are read as
`param[...].astype(compute_dtype)` (`ValueError: Unsupported type: QArray` in qwix's
`update_boxed`); (2) copies the base weight's `logical_axes` unchanged onto A and B, whose ranks
differ (A [D, r] tagged ("embed", "heads", "head_dim")), so they cannot be sharded by our rules;
(3) creates the adapters by mutating modules during a traced call, which does not compose with
`scan_layers` (blocks re-merged inside `lax.scan`). qwix still does the quantization itself
(`qwix.quantize` / `qwix.dequantize`, its NF4 code book and block scales).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix

# Weight matrices LoRA may target, and how many of each weight's leading axes are its input
# (contracted) axes: o maps [H, E] -> D, the others one input axis.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def lora_equations(equation: str) -> tuple[str, str]:
    """Splits `"x,w->y"` into the two LoRA einsums `"x,ar->m"` and `"m,rb->y"`.

    The weight's letters shared with the input are its input axes (they go to A, followed by
    the rank r); the rest are its output axes (they go to B, after r). E.g. q's
    "bld,dhe->blhe" gives "bld,dr->blr" and "blr,rhe->blhe".
    """
    inputs, out = equation.split("->")
    lhs, w = inputs.split(",")
    rank = next(c for c in "rstuvwxyz" if c not in equation)
    contracted = "".join(c for c in w if c in lhs)
    w_out = "".join(c for c in w if c not in lhs)
    mid = "".join(c for c in lhs if c not in contracted) + rank
    return f"{lhs},{contracted}{rank}->{mid}", f"{mid},{rank}{w_out}->{out}"


def dense_weight(value, dtype) -> jax.Array:
    """A stored weight (array or quantized `qwix.QArray`) as a `dtype` array."""
    if isinstance(value, qwix.QArray):
        value = qwix.dequantize(value)
    return value.astype(dtype)


def project(module, name: str, equation: str, x: jax.Array, compute_dtype) -> jax.Array:
    """`einsum(equation, x, W) + (alpha / rank) einsum(einsum(x, A), B)` for `module.<name>`.

    Args:
      module: the Attention or MLP module holding the weight `name` (and, with LoRA, the
        adapters `name_lora_a` [*in, r], `name_lora_b` [r, *out], the float `lora_scale`, and
        for training with dropout the rate `lora_dropout` and a PRNG key variable `lora_key`).
      equation: the projection's einsum, input first, e.g. "bld,dhe->blhe".
      x: the input activations, already in `compute_dtype`.
    Returns:
      The projection in `compute_dtype`.
    """
    w = getattr(module, name).get_value()
    if isinstance(w, qwix.QArray):
        # Recompute the dequantized weight in the backward pass rather than save it: as an
        # autodiff residual, every layer's float weight would be kept from forward to backward
        # (a float copy of the base, what QLoRA exists to avoid). Saved now: x and the codes.
        y = jax.checkpoint(
            lambda x, w: jnp.einsum(equation, x, dense_weight(w, compute_dtype)),
            policy=jax.checkpoint_policies.nothing_saveable,
        )(x, w)
    else:
        y = jnp.einsum(equation, x, dense_weight(w, compute_dtype))
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:  # no adapter on this projection (not targeted, or adapters off)
        return y
    b = getattr(module, f"{name}_lora_b")
    eq_a, eq_b = lora_equations(equation)
    rate, key = getattr(module, "lora_dropout", 0.0), getattr(module, "lora_key", None)
    if rate > 0 and key is not None:  # training: inverted dropout on the adapter's input only
        key = jax.random.fold_in(key.get_value(), PROJECTIONS.index(name))
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
    # x A first: [.., r] is tiny, so B A (a full [in, out] matrix) is never formed.
    xa = jnp.einsum(eq_a, x, a.get_value().astype(compute_dtype))
    delta = jnp.einsum(eq_b, xa, b.get_value().astype(compute_dtype))
    return y + (module.lora_scale * delta).astype(y.dtype)
