# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint format bench chaos install install-test clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python commons/pyproject.toml insights_backend/pyproject.toml
	$(BIN)/python -m pip install --quiet -e ./commons -e ./insights_backend
	@touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e './commons[test,metrics,cli]' -e './insights_backend[test]'
	@touch $@

$(BENCH_STAMP): $(TEST_STAMP) bench/requirements.txt
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	@touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

run: $(STAMP)
	cd insights_backend && ../$(BIN)/python -m insights_backend

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(TEST_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

# The model check's long run (make test runs a bounded one): two replicas on one Redis, random
# requests and faults for CHAOS_SECONDS. A failing run replays with make chaos CHAOS_SEED=<seed>
# (and the same CHAOS_SECONDS).
CHAOS_SECONDS ?= 600
CHAOS_SEED ?=
chaos: $(TEST_STAMP)
	@seed="$(CHAOS_SEED)"; [ -n "$$seed" ] || seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
	echo "chaos seed: $$seed (replay: make chaos CHAOS_SEED=$$seed CHAOS_SECONDS=$(CHAOS_SECONDS))"; \
	MODEL_CHECK_SECONDS=$(CHAOS_SECONDS) MODEL_CHECK_VERBOSE=1 $(BIN)/python -m pytest \
		commons/tests/model_check -m model_check -s --hypothesis-seed=$$seed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
