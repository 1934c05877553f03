"""Storage of a frozen base's weights: float32, bfloat16, or block-quantized int8 / NF4 (qwix).

A quantized weight W is stored as a `qwix.QArray`: codes q (int8, or uint4 for NF4) and one
float32 scale s per block of `block_size` consecutive entries along the weight's last input axis
(for every output column separately, as bitsandbytes blocks a row of an [out, in] matrix), so
W ~ s * decode(q):

- int8: s = absmax(block) / 127, q = round(W / s); |W - s q| <= s / 2 = absmax(block) / 254.
- nf4 (QLoRA, Dettmers et al. 2023): s = absmax(block), q = the nearest of the 16 NormalFloat
  code points c_i in [-1, 1]; |W - s c_q| <= absmax(block) * max_i (c_{i+1} - c_i) / 2
  = 0.1519 absmax(block) (the widest gap, between -1 and -0.696).

`error_bound(storage)` is that factor of the block's absmax. The bytes per stored parameter are
1 + 4/64 (int8) and 0.5 + 4/64 (nf4) at block 64: XLA packs uint4 two to a byte.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix

STORAGES = ("float32", "bfloat16", "int8", "nf4")
FLOAT_STORAGE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
QTYPES = {"int8": jnp.int8, "nf4": "nf4"}


def nf4_codes() -> np.ndarray:
    """The 16 NF4 code points qwix decodes to, read back through its public API (quantize a
    dense grid on [-1, 1] with one scale of 1 and dequantize), so the bound below follows the
    code book actually used."""
    grid = jnp.linspace(-1.0, 1.0, 4001, dtype=jnp.float32)
    decoded = qwix.dequantize(qwix.quantize(grid, "nf4"))
    return np.unique(np.asarray(decoded, np.float64))


def error_bound(storage: str) -> float:
    """Largest |W - dequantize(quantize(W))| as a fraction of the block's absmax (computed on
    call, not at import: importing must not start a JAX backend)."""
    if storage == "int8":
        return 0.5 / 127
    if storage == "nf4":
        return float(np.max(np.diff(nf4_codes())) / 2)
    raise ValueError(f"no quantization error bound for storage {storage!r}")


def non_projection_dtype(storage: str):
    """Storage dtype of the parameters that are not quantized (embeddings, norms, biases)."""
    return jnp.float32 if storage == "float32" else jnp.bfloat16


def block_layout(shape: tuple[int, ...], input_dims: int, block_size: int, stacked: bool):
    """(channelwise axes, {tiled axis: block}) for `qwix.quantize` of one weight.

    Args:
      shape: the weight's shape, `[L]? + input axes + output axes`.
      input_dims: how many axes after the optional layer axis are input axes.
      block_size: entries per scale along the last input axis (the whole axis if it is shorter).
      stacked: whether axis 0 is the scanned-layers axis.
    """
    offset = 1 if stacked else 0
    axis = offset + input_dims - 1  # the last input axis
    block = min(block_size, shape[axis])
    if shape[axis] % block:
        raise ValueError(
            f"weight of shape {shape}: block size {block} does not divide its input axis "
            f"{axis} of size {shape[axis]} (choose lora.block_size dividing it)"
        )
    channelwise = tuple(i for i in range(len(shape)) if i != axis)
    return channelwise, {axis: block}


@functools.partial(jax.jit, static_argnames=("storage", "channelwise", "tiled"))
def _quantize(w, *, storage, channelwise, tiled):
    return qwix.quantize(
        w.astype(jnp.float32),
        QTYPES[storage],
        channelwise_axes=channelwise,
        tiled_axes=dict(tiled),
    )


def store_weight(
    w: jax.Array, storage: str, *, input_dims: int, block_size: int = 64, stacked: bool = False
):
    """A projection weight in `storage`: an array (float32/bfloat16) or a `qwix.QArray`."""
    if storage in FLOAT_STORAGE:
        return w.astype(FLOAT_STORAGE[storage])
    if storage not in QTYPES:
        raise ValueError(f"base storage {storage!r} is not one of {', '.join(STORAGES)}")
    channelwise, tiled = block_layout(w.shape, input_dims, block_size, stacked)
    return _quantize(w, storage=storage, channelwise=channelwise, tiled=tuple(tiled.items()))


def _bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits  # 4 for (u)int4: XLA stores them packed
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return dtype.itemsize * 8


def tree_bytes(tree) -> int:
    """Bytes of every array leaf in `tree` (QArrays count codes and scales), 4-bit types packed."""
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(x.shape)) * _bits(x.dtype) // 8 for x in leaves)
