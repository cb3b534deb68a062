# Two commands on a fresh machine:
#   make run   - start the demo app (creates .venv)
#   make test  - lint, type-check and run the test suite on every Python 3.11+ found
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/python -m example_app

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ctxmiddleware tests bench example_app
	$(VENV)/bin/mypy --strict ctxmiddleware

test: $(VENV)/.installed
	./scripts/test-all-pythons

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/bench_core.py

clean:
	rm -rf $(VENV) .venv-*
