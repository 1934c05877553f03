"""The array checksum: equal to a slow NumPy reference of the documented formula, and every
single-word change, a swap of two elements and a 16-byte flip change it, for every dtype."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rsa_jax.training._checksum import SEED, tree_checksums, tree_layout

M = (1 << 32) - 1


def fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M
    return h ^ (h >> 16)


def reference(x: np.ndarray) -> str:
    """The module docstring's h_A, h_B with Python integers, one word at a time."""
    if x.dtype == np.bool_:
        words = x.astype(np.uint32).reshape(-1)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
        words = np.ascontiguousarray(x).view(unsigned).astype(np.uint32).reshape(-1)
    h_a = h_b = 0
    for i, w in enumerate(words.tolist()):
        mix = fmix32(i ^ SEED)
        h_a = (h_a + fmix32((w + mix) & M)) & M
        h_b = (h_b + w * (mix | 1)) & M
    return f"{h_a:08x}{h_b:08x}"


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((7, 5)).astype(np.float32),
        "bf16": rng.standard_normal((3, 4, 2)).astype(ml_dtypes.bfloat16),
        "i8": rng.integers(-128, 127, size=(9,), dtype=np.int8),
        "bool": rng.random((4, 3)) > 0.5,
        "i32": np.array(12345, np.int32),
    }


def test_matches_the_numpy_reference():
    values = arrays()
    got = tree_checksums({k: jnp.asarray(v) for k, v in values.items()})
    assert got == {f"['{k}']": reference(v) for k, v in values.items()}


@pytest.mark.parametrize("name", ["f32", "bf16", "i8", "bool", "i32"])
def test_every_single_element_change_is_detected(name):
    x = arrays()[name]
    base = tree_checksums(jnp.asarray(x))
    flat = x.reshape(-1)
    for i in range(flat.size):
        y = flat.copy()
        if x.dtype == np.bool_:
            y[i] = not y[i]
        else:
            view = y.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
            view[i] ^= 1 << (i % (8 * x.dtype.itemsize))  # one bit, at varying places
        assert tree_checksums(jnp.asarray(y.reshape(x.shape))) != base, i


def test_position_matters_and_a_16_byte_flip_is_detected():
    x = np.arange(1024, dtype=np.float32).reshape(32, 32)
    base = tree_checksums(jnp.asarray(x))
    swapped = x.copy()
    swapped[[3, 17]] = swapped[[17, 3]]
    assert tree_checksums(jnp.asarray(swapped)) != base
    assert tree_checksums(jnp.asarray(x.T.copy())) != base  # same values, same shape
    flipped = x.copy()
    flipped.reshape(-1).view(np.uint8)[2000:2016] ^= 0xFF
    assert tree_checksums(jnp.asarray(flipped)) != base


def test_layout_names_shapes_and_dtypes():
    tree = {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": [jnp.int32(1)]}
    assert tree_layout(tree) == {
        "['a']": {"shape": [2, 3], "dtype": "bfloat16"},
        "['b'][0]": {"shape": [], "dtype": "int32"},
    }
    assert tree_checksums({}) == {}
