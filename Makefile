# grassroots — `make help` lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install lock run test test-fast lint format typecheck bench bench-exit bench-intake bench-latency bench-seed bench-sync bench-console soak screenshots clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Exact versions from the lock file (hash-checked), then the project itself on top of them.
$(BIN)/grassroots: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

install: $(BIN)/grassroots ## Create .venv and install grassroots with its dev tools, from the lock

LOCK := $(BIN)/pip-compile --quiet --strip-extras --generate-hashes --allow-unsafe \
	--no-emit-index-url --no-emit-find-links
lock: install ## Resolve pyproject.toml's ranges again into requirements/ (then review the diff)
	$(LOCK) --upgrade -o requirements/runtime.txt pyproject.toml
	$(LOCK) --upgrade --extra dev -o requirements/dev.txt pyproject.toml

# `make run ARGS="--port 8100 --flower-port 5600"`: options for `grassroots run`.
ARGS ?=
run: install ## Run the whole local stack (receiver, worker, beat, Flower) on embedded defaults; ARGS="--port P --flower-port Q"
	$(BIN)/grassroots run $(ARGS)

test: install ## Run the whole test suite (needs PostgreSQL and Redis on 127.0.0.1)
	$(BIN)/pytest

test-fast: install ## Run the tests that need no worker processes
	$(BIN)/pytest -m "not slow"

lint: install ## ruff (lint and format check), mypy, and the import layers (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy worker tasks models tests bench docs/console
	$(BIN)/lint-imports

format: install ## Format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bench-exit bench-intake bench-latency bench-seed bench-sync bench-console ## All the benchmarks (see bench/README.md), some minutes

# `make bench-exit ARGS="--runs 5"`, `make bench-latency ARGS="--rate 50 --seconds 20"`.
bench-exit: install ## The 100,000-student exit, 3 runs alternated with its floor (no-op tasks, batches without Celery): phases, floors, ratios
	$(BIN)/python -m bench.exit_pipeline $(ARGS)

bench-latency: install ## One users.deleted webhook to its account converted, 20/s for a minute: p50/p90/p99 and where the time goes
	$(BIN)/python -m bench.latency $(ARGS)

bench-intake: install ## Signed webhook intake: burst throughput, latency at 500 events/s
	$(BIN)/python -m bench.intake --server-workers 2

bench-seed: install ## Seeding the 100,000-student district, and its exit in one process
	$(BIN)/python -m bench.seed_and_exit

bench-sync: install ## Roster syncs of the 100,000-student district from a Clever-shaped API
	$(BIN)/python -m bench.sync

soak: install ## Events through a real stack while workers, Redis, Postgres connections, receiver and beat fail (minutes)
	$(BIN)/python -m bench.soak

bench-console: install ## Every console page over a million inbox rows and 10,000 dead letters
	$(BIN)/python -m bench.console

screenshots: install ## Screenshots of every console page over the example district, into docs/console/
	$(BIN)/python docs/console/screenshots.py

clean: ## Remove the virtualenv and local state
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
