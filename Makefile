# Two entry points: `make run` (the demo on the embedded store) and `make test`
# (servers, lint, types and the whole suite). Both create the virtual environment themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test servers lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/farmhand up --demo

# PostgreSQL and Redis binaries for the server-backed tests (the tests start and stop the
# servers themselves, on loopback, in temporary directories)
servers:
	@./scripts/install-servers

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: servers lint typecheck
	$(BIN)/python -m pytest

bench: $(STAMP) servers
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench_sqlite.py
	$(BIN)/python benchmarks/bench_servers.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
