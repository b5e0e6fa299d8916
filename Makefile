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
	$(BIN)/python -m pip install --quiet -e './commons[metrics,cli]' -e ./insights_backend
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

# The model check's long run (make test runs a bounded one): two replicas on a Redis topology,
# random requests and faults, on every topology of CHAOS_TOPOLOGY (single, cluster, sentinel;
# comma-separated), CHAOS_SECONDS split evenly between them. A failing run replays with
# make chaos CHAOS_SEED=<seed> (and the same CHAOS_SECONDS and CHAOS_TOPOLOGY). Fault kinds that
# are left out because of a known defect run with MODEL_CHECK_ENABLE_FAULTS=<kind,...>.
CHAOS_SECONDS ?= 600
CHAOS_SEED ?=
CHAOS_TOPOLOGY ?= single,cluster,sentinel
chaos: $(TEST_STAMP)
	@seed="$(CHAOS_SEED)"; [ -n "$$seed" ] || seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
	count=$$(echo "$(CHAOS_TOPOLOGY)" | tr ',' '\n' | grep -c .); \
	per=$$(( $(CHAOS_SECONDS) / count )); \
	echo "chaos seed: $$seed, $$per s on each of $(CHAOS_TOPOLOGY) (replay: make chaos CHAOS_SEED=$$seed CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_TOPOLOGY=$(CHAOS_TOPOLOGY))"; \
	MODEL_CHECK_TOPOLOGIES=$(CHAOS_TOPOLOGY) MODEL_CHECK_SECONDS=$$per \
		MODEL_CHECK_TOPOLOGY_SECONDS=$$per MODEL_CHECK_VERBOSE=1 $(BIN)/python -m pytest \
		commons/tests/model_check -m model_check -s --hypothesis-seed=$$seed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
