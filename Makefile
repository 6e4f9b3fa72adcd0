# On a fresh machine:
#   make demo   - create the environment (.venv), then train and evaluate a small DETR on the
#                 built-in synthetic dataset (10 minutes on a CPU; DEMO_MINUTES=30 for longer)
#   make test   - create the environment, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-slow lint docs wheel-check mutate demo clean

DEMO_MINUTES ?= 10

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow -o addopts=""

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

docs: setup
	$(VENV)/bin/mkdocs build --strict

# Build the wheel, install it in a new environment outside the source tree, run the CLI from there.
wheel-check: setup
	VENV=$(VENV) bash scripts/check_wheel.sh

# Break the lines changed since BASE one at a time and list the breakages no test catches (slow; not in CI).
BASE ?= main~1
mutate: setup
	$(PY) scripts/mutate.py --base $(BASE) $(MUTATE_ARGS)

demo: setup
	$(PY) -m detrkit train --preset cpu-tiny --data synthetic --output-dir runs/demo --time-budget $(DEMO_MINUTES) --overwrite
	$(PY) -m detrkit plot runs/demo
	$(PY) -m detrkit predict runs/demo/synthetic-data/val2017 --weights runs/demo/checkpoint_best.pth \
		--out runs/demo/predictions --threshold 0.5

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
