"""Model merging: RSA(P) / P-SACPO weight averages of two policies."""

from __future__ import annotations


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
