# On a fresh machine:
#   make test   - create the environment (.venv), then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-slow lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow -o addopts=""

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
