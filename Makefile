# Two commands on a fresh machine:
#   make run   - start the demo app (creates .venv-run: runtime dependencies only)
#   make test  - lint, type-check, check the import contracts and run the test
#                suite on every Python 3.11+ found (creates .venv and .venv-3.x)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Development and test tools: ruff, mypy, import-linter, pytest, servers, drivers.
VENV     := .venv
# What example_app imports: Starlette, uvicorn, httpx (/fanout), asyncpg
# (DATABASE_URL) and anyio (SQLite in a worker thread; the DB helpers); Flask,
# gunicorn and psycopg for `python -m example_app --wsgi`.
RUN_VENV := .venv-run
RUN_DEPS := '.[starlette,asyncpg,httpx,sqlite,flask,psycopg]' 'uvicorn>=0.30' 'gunicorn>=22'

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

$(RUN_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q --upgrade pip
	$(RUN_VENV)/bin/pip install -q -e $(RUN_DEPS)
	touch $@

run: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/python -m example_app

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ctxmiddleware tests bench example_app
	$(VENV)/bin/mypy --strict ctxmiddleware
	$(VENV)/bin/lint-imports --no-cache --no-logo

test: $(VENV)/.installed
	./scripts/test-all-pythons

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/bench_core.py

clean:
	rm -rf $(VENV) .venv-*
