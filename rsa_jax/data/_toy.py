"""Synthetic rows in the PKU-SafeRLHF schema for smoke runs and tests (`rsa-jax toy-data`)."""

from __future__ import annotations

import json
import os

import numpy as np

_TOY_WORDS = ["bread", "safe", "help", "no", "story", "Paris", "kind", "sorry", "yes", "bake"]


def write_toy_data(path: str, rows: int = 64, seed: int = 0) -> None:
    """Synthetic rows in the PKU-SafeRLHF schema (the real set is not redistributable here)."""
    rng = np.random.default_rng(seed)

    def text(k):
        return " ".join(rng.choice(_TOY_WORDS, size=k))

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i in range(rows):
            row = {
                "prompt": f"q{i} " + text(int(rng.integers(2, 8))),
                "response_0": "safe help " + text(int(rng.integers(2, 10))),
                "response_1": "no " + text(int(rng.integers(2, 10))) + " sorry",
                "better_response_id": int(rng.integers(0, 2)),
                "safer_response_id": 0,
                "is_response_0_safe": True,
                "is_response_1_safe": False,
            }
            f.write(json.dumps(row) + "\n")
