"""Convert a GGUF file (default: the bundled SmolLM2-135M-Instruct) into a local HF directory.

python -m rsa_jax.models.convert [--gguf PATH] [--out artifacts/smollm2-135m] [--overwrite]
"""

from __future__ import annotations

import argparse
import os

from rsa_jax.models._gguf import bundled_smollm2_gguf, convert_gguf

DEFAULT_OUT = os.path.join("artifacts", "smollm2-135m")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--gguf", default=None, help="GGUF file (default: bundled SmolLM2)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output Hugging Face directory")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = convert_gguf(args.gguf or bundled_smollm2_gguf(), args.out, overwrite=args.overwrite)
    print(f"converted model in {out}")


if __name__ == "__main__":
    main()
