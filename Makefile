# Two commands on a fresh machine:
#   make demo   - create the environment, then make a synthetic dataset and train/evaluate a small DETR on it
#   make test   - create the environment, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-slow lint demo clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

demo: setup
	$(PY) -m detrkit demo --out runs/demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
