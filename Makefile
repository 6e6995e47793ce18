# One entry point for a newcomer: `make run` serves, `make test` proves it.
# Everything runs from the project's own virtual environment in .venv, made on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pytest arguments, e.g. `make test PYTEST_ARGS="-k credit -x"`.
PYTEST_ARGS ?=

.PHONY: help venv gen run test lint format bench chaos restore-drill clean

help:
	@echo "make run    start PostgreSQL (embedded), both services and the gateway; Ctrl-C stops all"
	@echo "make test   run the whole test suite against a real PostgreSQL"
	@echo "make gen    regenerate gen/ and the Envoy configs from protos/"
	@echo "make lint   ruff, mypy --strict, buf lint, buf breaking, generated-code freshness"
	@echo "make chaos  5 minutes of faults against real processes, then every invariant"
	@echo "make restore-drill  back up the embedded PostgreSQL under load, restore to a point in time, check"
	@echo "make bench  the two services against the single-transaction baseline (docs/performance.md)"
	@echo "make clean  remove the virtual environment and the local database"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Everything generated from protos/: gen/, then the two Envoy configs whose routes and descriptor come from it.
gen: $(STAMP)
	$(BIN)/python scripts/generate_protos.py
	$(BIN)/python -m devstack render-envoy
	$(BIN)/python deploy/k8s/render_gateway.py

run: $(STAMP)
	$(BIN)/python -m devstack run

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/buf lint
	$(BIN)/python scripts/generate_protos.py --check
	$(BIN)/python -m devstack render-envoy --check
	$(BIN)/python deploy/k8s/render_gateway.py --check
	$(BIN)/python scripts/buf_breaking.py

# The two services against the single-transaction baseline (docs/performance.md). BENCH_ARGS="--concurrency 32".
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Five minutes of faults against real processes, then every invariant. CHAOS_ARGS="--quick --seed N".
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

# A base backup and WAL archive of the embedded PostgreSQL under load, a point-in-time restore,
# both services on it, every invariant (docs/operations.md). DRILL_ARGS="--quick" or "--keep".
restore-drill: $(STAMP)
	$(BIN)/python -m tests.restore_drill $(DRILL_ARGS)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
