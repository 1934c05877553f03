#!/usr/bin/env bash
# One command for an accelerator machine: our DPO and Ra-DPO train steps (fused and logits heads,
# bfloat16) on SmolLM2-135M and a random-init 1B Llama; prints tokens/s and MFU against the
# device's peak and finishes within 10 minutes (bench/accelerator.py --budget-s stops starting
# new measurements after 9). Extra arguments go to bench/accelerator.py, e.g.
#
#   bash bench/accelerator.sh                       # GPU/TPU: the full run
#   bash bench/accelerator.sh --smoke               # any machine: tiny models, toy sizes
#   bash bench/accelerator.sh --peak-tflops 312     # a device missing from the peak table
#
# Uses .venv/bin/python when present, else python3 (set PYTHON to choose). TIMEOUT_S (default 600)
# is the hard wall-clock limit of the whole run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
  # Let XLA take most of the GPU's memory up front (its default is 75%).
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
fi
# The repository's rsa_jax first, whatever is installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${TIMEOUT_S:-600}" "$python" bench/accelerator.py "$@"
