# Two commands on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench bench-http lint clean prism bytecode

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## bytecode: the package compiled up front. Where PYTHONDONTWRITEBYTECODE is set (some containers set it), every
## `dispatch` process would otherwise compile each of its modules from source again: a quarter of a second a start
bytecode: $(BIN)/python
	$(BIN)/python -m compileall -q dispatcher

## demo: create .venv, install, run a real campaign end to end on the embedded defaults
demo: $(VENV)/.installed bytecode
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

## test: install dev extras, make sure Redis is reachable, run the whole suite: the tests not marked slow
## TEST_JOBS at a time, then the slow ones (worker processes, faults, timings) one at a time (scripts/suite.py)
TEST_JOBS ?= 2
test: $(VENV)/.installed-dev prism bytecode
	$(BIN)/python scripts/with_redis.py $(BIN)/python scripts/suite.py --jobs $(TEST_JOBS) $(PYTEST_ARGS)

## prism: install the pinned Prism (Twilio's OpenAPI served as a mock) under .cache/ when npm is present;
## without it the Twilio contract tests skip locally and fail under CI
PRISM_VERSION := 5.16.0
PRISM := .cache/prism/node_modules/.bin/prism
prism:
	@if [ -x $(PRISM) ] && grep -q '"version": "$(PRISM_VERSION)"' .cache/prism/node_modules/@stoplight/prism-cli/package.json 2>/dev/null; then \
		:; \
	elif command -v npm >/dev/null 2>&1; then \
		npm install --no-audit --no-fund --silent --save-exact --prefix .cache/prism @stoplight/prism-cli@$(PRISM_VERSION); \
	else \
		echo "npm not found: Prism not installed, the Twilio contract tests will skip (and fail under CI)"; \
	fi

## bench: print throughput and memory figures, then Twilio-compatible sending against the twilio library alone
## (needs Redis, which it starts if needed, and PostgreSQL)
bench: $(VENV)/.installed-dev bytecode
	@# both run even when the first misses a target; the exit status says whether every target was met
	@rc=0; \
	$(BIN)/python scripts/with_redis.py $(BIN)/python bench/bench_pipeline.py $(BENCH_ARGS) || rc=1; \
	$(BIN)/python scripts/with_redis.py $(BIN)/python bench/bench_twilio_concurrency.py || rc=1; \
	exit $$rc

## bench-http: the HTTP adapter sending a 10,000-person campaign in batched calls to a local provider
bench-http: $(VENV)/.installed-dev
	$(BIN)/python bench/bench_http_gateway.py $(BENCH_ARGS)

## lint: ruff, mypy, and the architecture's import contracts ([tool.importlinter] in pyproject.toml)
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check dispatcher tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf var/demo .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
