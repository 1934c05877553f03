"""Random preference-pair cases for loss tests: logits, labels and masks with every edge case."""

from __future__ import annotations

import numpy as np


def make_mask(n_rows: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """[n_rows, T] response masks covering the edge cases in turn.

    Row kinds, cycling: ordinary (prompt then response then padding), empty prompt (response from
    position 0), fully padded (no response), single-token response, response up to the last slot.
    """
    mask = np.zeros((n_rows, t), bool)
    for i in range(n_rows):
        kind = i % 5
        if kind == 0:
            start = int(rng.integers(1, max(2, t // 2)))
            mask[i, start : start + int(rng.integers(1, t - start + 1))] = True
        elif kind == 1:
            mask[i, : int(rng.integers(1, t + 1))] = True
        elif kind == 3:
            mask[i, int(rng.integers(0, t))] = True
        elif kind == 4:
            mask[i, int(rng.integers(0, t)) :] = True
    return mask


def make_case(n_pairs: int, t: int, v: int, seed: int = 0, scale: float = 2.0):
    """Random policy/reference logits, labels and masks for 2 * n_pairs sequences (float32)."""
    rng = np.random.default_rng(seed)
    n = 2 * n_pairs
    policy = (scale * rng.normal(size=(n, t, v))).astype(np.float32)
    # The reference is a perturbation of the policy, as in training.
    ref = (policy + rng.normal(size=(n, t, v))).astype(np.float32)
    labels = rng.integers(0, v, size=(n, t)).astype(np.int32)
    mask = make_mask(n, t, rng)
    return policy, ref, labels, mask
