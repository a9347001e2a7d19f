# detox-sft: every target builds the environment first if it is missing (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp changes when a pinned file changes, so `make setup` reinstalls only then.
STAMP := $(VENV)/.setup-$(shell cat requirements.txt requirements-caikit.txt pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
RECIPE ?= offline
PYTEST_ARGS ?=

.PHONY: setup demo test lint lab bench slides clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-caikit.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: the CPU wheel; otherwise a dependency pulls the CUDA build.
	$(BIN)/python -m pip install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# The caikit stack pins old torch/transformers/numpy: installed beside the main stack without its pins.
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-caikit.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.setup-*
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/detox-sft demo --recipe $(RECIPE)

test: setup lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks

lab: setup
	$(BIN)/jupyter lab notebooks/

bench: setup
	for b in rephrase training generation s3; do HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/$$b.py || exit 1; done

slides: setup
	$(BIN)/python -m detox_sft.slides slides/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
