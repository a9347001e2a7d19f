# detox-sft: every target builds the environment first if it is missing (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp changes when a pinned file changes, so `make setup` reinstalls only then.
STAMP := $(VENV)/.setup-$(shell cat requirements.txt requirements-caikit.txt pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
RECIPE ?= offline
PYTEST_ARGS ?=
UV := uv==0.13.9
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_PIP = $(BIN)/uv pip install --quiet --python $(BIN)/python $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

.PHONY: setup demo test lint lab bench slides clean setup-py312 check-py312 smoke-py312 test-py312

setup: $(STAMP)

$(STAMP): requirements.txt requirements-caikit.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip $(UV)
	# uv installs the pinned sets (the same pins; ~10x faster than pip on a fresh venv). It reads no pip.conf: a
	# find-links folder that pip is given (this machine's CPU torch wheel) is passed on.
	# torch first: on 3.11, the CPU wheel on this machine's disk, else a dependency pulls the CUDA build; on 3.12
	# PyPI has only the CUDA build (nvidia-* wheels included) for Linux x86_64: it runs on the CPU all the same.
	$(UV_PIP) "$$(grep -E '^torch==' requirements.txt)"
	$(UV_PIP) -r requirements.txt
	# The caikit stack pins old torch/transformers/numpy: installed beside the main stack without its pins.
	$(UV_PIP) --no-deps -r requirements-caikit.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.setup-*
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/detox-sft-dev demo --recipe $(RECIPE)

# The test files on PYTEST_WORKERS processes (pytest-xdist), each file's tests on one worker, so a session fixture
# (the demo run, the local Ray) starts once: on 2 cores the servers' and subprocesses' waits overlap (5.5 vs 8-12 min).
PYTEST_WORKERS ?= 2
test: setup lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check src tests benchmarks

lab: setup
	$(BIN)/jupyter lab notebooks/

# bench reruns each record's own command (its provenance, else BENCHMARKS.md's Reproduce: line): the committed
# figures' parameters, never the benchmarks' defaults; then BENCHMARKS.md's record-status block is rewritten.
bench: setup
	cmds=$$($(BIN)/python benchmarks/provenance.py --commands) || exit 1; \
	echo "$$cmds" | while read -r cmd; do echo "+ $$cmd"; HF_HUB_OFFLINE=1 $(BIN)/python $$cmd < /dev/null || exit 1; done && \
	$(BIN)/python benchmarks/provenance.py --pages

slides: setup
	$(BIN)/detox-sft-dev slides slides/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# --- Python 3.12 (RHOAI 3.x workbench images) ---------------------------------------------------------------------
# CI runs the full suite on 3.11 (`make test`), then `make test-py312`: every module imported and a declared subset of
# the tests under 3.12. The interpreter: PYTHON312, else the newest 3.12 under pyenv, else python3.12 on PATH; with
# none, test-py312 says so and passes. The 3.12 venv carries PyPI's CUDA build of torch and its nvidia-* wheels
# (~6.5 GB; about 10 minutes to build on 2 cores), so it lives in the cache beside the offline zoo, outside the clone
# (a fresh clone reuses it), built when missing and updated in place when a pinned file changes.
PYTHON312 ?= $(firstword $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12))) $(shell command -v python3.12 2>/dev/null))
VENV312 ?= $(or $(DETOX_SFT_CACHE),$(HOME)/.cache/detox-sft)/venv-py312
PY312 := $(VENV312)/bin/python
# The tests that need no offline zoo (its hash holds torch's version, so 3.12 would build its own: minutes) and cover
# each module's own unit tests: config parsing, prompts, devices, compat shims, metrics, files, storage on the real
# S3 server, clients (every module is imported by PY312_IMPORTS below). The two deselected compat tests start fresh
# interpreters (~20 s each); the full suite runs them on 3.11.
PY312_TESTS ?= tests/test_config.py tests/test_prompts.py tests/test_devices.py tests/test_compat.py \
  tests/test_metrics.py tests/test_files.py tests/test_storage.py tests/test_clients.py tests/test_properties.py \
  --deselect tests/test_compat.py::test_conversation_shim_still_needed \
  --deselect tests/test_compat.py::test_numpy_issubclass_shim_still_needed
PY312_FOUND = { [ -n "$(PYTHON312)" ] && "$(PYTHON312)" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
PY312_IMPORTS := import importlib, pkgutil, detox_sft, detox_sft_dev; from detox_sft.compat import import_tmarco; \
  [importlib.import_module(m.name) for p in (detox_sft, detox_sft_dev) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]; import_tmarco(); \
  [importlib.import_module(m) for m in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "evaluate", \
  "ray.data", "caikit", "caikit_nlp", "caikit_tgis_backend", "caikit_nlp_client", "sentence_transformers", "openai", "jsonargparse")]; \
  print("test-py312: the packages and their stack import on", __import__("sys").version.split()[0])

# Always the tests under 3.12 (the venv built first when missing), never a dry run only.
test-py312:
	@if ! $(PY312_FOUND); then \
	  echo "test-py312: SKIPPED: no Python 3.12 interpreter (PYTHON312='$(PYTHON312)'; looked in ~/.pyenv/versions and PATH)"; \
	else \
	  $(MAKE) --no-print-directory smoke-py312; \
	fi

# The 3.12 venv, built like .venv by `make setup`.
setup-py312:
	@$(PY312_FOUND) || { echo "setup-py312: no Python 3.12 interpreter; set PYTHON312=/path/to/python3.12" >&2; exit 1; }
	@$(MAKE) --no-print-directory setup VENV="$(VENV312)" PYTHON="$(PYTHON312)"

# Without installing: the pinned sets resolve for 3.12 with wheels only (pip on the 3.12 interpreter, so markers are
# 3.12's), pyproject admits 3.12, and the sources parse as 3.12. Downloads ~1 GB of wheels (no metadata-only index).
check-py312: setup
	$(BIN)/python -m pip --python "$(PYTHON312)" install --dry-run --quiet --ignore-installed --only-binary=:all: -r requirements.txt
	$(BIN)/python -m pip --python "$(PYTHON312)" install --dry-run --quiet --ignore-installed --only-binary=:all: --no-deps -r requirements-caikit.txt
	$(BIN)/python -c 'import sys, tomllib; from packaging.specifiers import SpecifierSet; \
	  spec = SpecifierSet(tomllib.load(open("pyproject.toml", "rb"))["project"]["requires-python"]); \
	  sys.exit(None if sys.argv[1] in spec else f"requires-python {spec} excludes {sys.argv[1]}")' \
	  "$$("$(PYTHON312)" -c 'import platform; print(platform.python_version())')"
	"$(PYTHON312)" -c 'import ast, pathlib; [ast.parse(p.read_bytes(), str(p)) for d in ("src", "tests", "benchmarks") for p in pathlib.Path(d).rglob("*.py")]'
	@echo "test-py312: the pinned sets resolve for 3.12, pyproject admits it, the sources parse"

# The package installed from this clone (the venv may serve another clone), pip check (caikit's own pins only, as
# requirements-caikit.txt says), the imports, the fast tests.
smoke-py312: setup-py312
	$(PY312) -m pip install --quiet --no-deps --no-build-isolation -e .
	@! $(PY312) -m pip check 2>&1 | grep -vE '^caikit(-nlp|-nlp-client)? '
	HF_HUB_OFFLINE=1 $(PY312) -c '$(PY312_IMPORTS)'
	HF_HUB_OFFLINE=1 $(PY312) -m pytest -q -p no:cacheprovider $(PY312_TESTS)

.PHONY: faults
# Kill each long step with SIGKILL inside its work (4 interrupting kills in each third of its progress), then fill
# the disk, kill the S3 server and the model server under the steps and requests; rerun, compare; records in
# benchmarks/results/faults/, FAULTS.md.
faults: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/faults.py --trials 4 --seed 0
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/faults_env.py --trials 2 --seed 0
