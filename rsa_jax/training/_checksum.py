"""Sharding-independent checksums of array pytrees, for checkpoint integrity.

An array x is read as n 32-bit words w_0 ... w_{n-1} (its elements in row-major order, each
bit-cast to an unsigned integer of its own width and widened to uint32; 8-byte elements give two
words). With m_i = f(i xor SEED) a pseudo-random mix of the position, its checksum is the pair

    h_A(x) = sum_i f(w_i + m_i)          mod 2^32,      f = MurmurHash3's 32-bit finalizer
    h_B(x) = sum_i w_i * (m_i or 1)      mod 2^32

written as 16 hex digits. Any single changed word changes both sums: f is a bijection of uint32,
and an odd multiplier is invertible mod 2^32. A corruption that changes several words goes
unnoticed by the nonlinear h_A with probability about 2^-32, and by both only when the linear
h_B cancels too (about 2^-64 for accidental damage; neither is a defence against a forger).

Why not crc32 or sha256 of the bytes: both are sequential over the bytes, so a sharded array
would have to be gathered onto one host first (the whole model and optimizer state, for every
save). The sum above is one jitted reduction computed where the shards live: integer addition
mod 2^32 is associative and commutative, so the value is the same for every sharding, mesh and
process count (a checkpoint saved on 8 devices verifies when restored on 1), and in a
multi-process run every process gets the same global value, computed from the shards it read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

SEED = 0x9E3779B9


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finalizer: a bijection of uint32 that mixes every input bit into every
    output bit (uint32 multiplication wraps mod 2^32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The elements of x as uint32 words: shape x.shape, or x.shape + (2,) for 8-byte dtypes."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    if width == 4:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if width in (1, 2):
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[width]
        return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if width == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major position of every element, mod 2^32: uint32 [*shape]."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 [2]: (h_A(x), h_B(x))."""
    words = _words(x)
    mix = _fmix32(_flat_index(words.shape) ^ jnp.uint32(SEED))
    h_a = jnp.sum(_fmix32(words + mix), dtype=jnp.uint32)
    h_b = jnp.sum(words * (mix | jnp.uint32(1)), dtype=jnp.uint32)
    return jnp.stack([h_a, h_b])


def _tree_sums(tree):
    return jax.tree.map(_leaf_checksum, tree)


@functools.cache
def _jitted(out_sharding):
    # One compiled reduction per tree structure, shapes and shardings (jit's own cache), with
    # replicated outputs so that every process can read the values.
    if out_sharding is None:
        return jax.jit(_tree_sums)
    return jax.jit(_tree_sums, out_shardings=out_sharding)


def _replicated_output(leaves) -> NamedSharding | None:
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def tree_checksums(tree) -> dict[str, str]:
    """{path: 16 hex digits} for every array leaf of `tree` (keys from `jax.tree_util.keystr`).

    The arrays may be sharded over any mesh and processes; every process gets the same result.
    Blocks until the checksums are computed (a small device-to-host transfer).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        return {}
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for _, x in flat]
    sums = _jitted(_replicated_output(leaves))(leaves)
    host = jax.device_get(sums)
    return {p: f"{int(s[0]):08x}{int(s[1]):08x}" for p, s in zip(paths, host, strict=True)}


def tree_layout(tree) -> dict[str, dict]:
    """{path: {"shape": [...], "dtype": "float32"}} of every leaf (arrays or ShapeDtypeStructs)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(p): {"shape": list(x.shape), "dtype": str(x.dtype)} for p, x in flat
    }
