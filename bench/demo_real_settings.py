"""`make demo-real` at other settings: any `RealDemoConfig` fields, given as one JSON object.

    PYTHONPATH=$PWD python bench/demo_real_settings.py '{"out_dir": "runs/dr_c", "methods":
        ["SACPO"], "train_harmful": 96, "train_benign": 48, "epochs": 3, "candidates_every": 0,
        "eval_harmful": 16, "eval_benign": 8, "eval_samples": 4, "eval_max_tokens": 12,
        "betas": [0.01], "candidate_betas": [0.01], "extra_overrides": ["stages.0.beta=1.0"]}'

Prints what `rsa-jax demo-real` prints: the pair counts, each stage's training summary and the
held-out table, where the base model (the baseline) is evaluated in the same run on the same
prompts and draws. The runs behind docs/results.md ("Why nothing moved") are this command with
`betas` [0.1] or [0.01], and with or without "stages.0.beta=1.0".
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is installed for `rsa-jax compile`


def main(argv: list[str]) -> None:
    from rsa_jax.demo_real import RealDemoConfig, run_real_demo

    if len(argv) != 1:
        sys.exit(__doc__)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(argv[0]).items()}
    run_real_demo(RealDemoConfig(**fields))


if __name__ == "__main__":
    main(sys.argv[1:])
