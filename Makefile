# Two commands on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## demo: create .venv, install, run a real campaign end to end on the embedded defaults
demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

## test: install dev extras, make sure Redis is reachable, run the whole suite
test: $(VENV)/.installed-dev
	$(BIN)/python scripts/with_redis.py $(BIN)/python -m pytest $(PYTEST_ARGS)

## bench: print throughput and memory figures (needs Redis; starts a throwaway one if needed)
bench: $(VENV)/.installed-dev
	$(BIN)/python scripts/with_redis.py $(BIN)/python bench/bench_pipeline.py $(BENCH_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check dispatcher tests bench scripts
	$(BIN)/mypy

clean:
	rm -rf var/demo .pytest_cache .mypy_cache .ruff_cache
