# driftrl: the two commands that matter are `make run` and `make test` (see README.md).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.driftrl-setup
PYTEST_BUDGET_S ?= 1800

.PHONY: setup system-deps run test test-fast test-slow lint bench bench-quick clean

# Idempotent: reinstalls only when pyproject.toml changed since the last successful setup.
setup: $(STAMP) system-deps
	@$(BIN)/python -c "import vllm, ray, deepspeed, transformers, torch; print(f'driftrl setup ok: vllm {vllm.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, torch {torch.__version__}')" 2>/dev/null | tail -n 1

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "driftrl needs $(PY) (Python 3.11) on PATH" >&2; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	# torch==2.13.0 resolves to the CPU wheel in the machine's wheel directory (PIP_FIND_LINKS).
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[cpu,dev,tensorboard,wandb,bench-trl]" "torch==2.13.0"
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside CPU torch.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	@touch $(STAMP)

# The end-to-end tests scrape driftrl with a real Prometheus server (Debian package).
system-deps:
	@command -v prometheus >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "install Prometheus (>= 2.x) and put it on PATH" >&2; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

run: setup
	$(BIN)/driftrl run --config configs/tiny-cpu.yaml

test: setup
	$(BIN)/python -m pytest -q -m "not slow" --timeout=600 --durations=15
	$(BIN)/python -m pytest -q -m slow --timeout=900 --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --timeout=600 --durations=15

lint: setup
	$(BIN)/ruff check .

bench: setup
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# every benchmark's smoke run (what tests/benchmarks/test_quick_modes.py checks)
bench-quick: setup
	@for b in benchmarks/[!_]*.py; do echo "== $$b --quick"; $(BIN)/python $$b --quick || exit 1; done
	@for b in benchmarks/[!_]*.sh; do [ -e "$$b" ] || continue; echo "== $$b --quick"; bash $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
