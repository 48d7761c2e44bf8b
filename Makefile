# grassroots — `make help` lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format typecheck bench bench-exit bench-intake bench-seed clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/grassroots: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/grassroots ## Create .venv and install grassroots with its dev tools

run: install ## Run the whole local stack (receiver, worker, beat, Flower) on embedded defaults
	$(BIN)/grassroots run

test: install ## Run the whole test suite (needs PostgreSQL and Redis on 127.0.0.1)
	$(BIN)/pytest

test-fast: install ## Run the tests that need no worker processes
	$(BIN)/pytest -m "not slow"

lint: install ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy worker tasks models tests bench

format: install ## Format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bench-exit bench-intake bench-seed ## All the benchmarks (see bench/README.md), a few minutes

bench-exit: install ## The 100,000-student district's exit through Redis and grassroots workers
	$(BIN)/python bench/exit_pipeline.py

bench-intake: install ## Signed webhook intake: burst throughput, latency at 500 events/s
	$(BIN)/python bench/intake.py --server-workers 2

bench-seed: install ## Seeding the 100,000-student district, and its exit in one process
	$(BIN)/python bench/seed_and_exit.py

clean: ## Remove the virtualenv and local state
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
