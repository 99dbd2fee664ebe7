# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Each creates the virtual environment in .venv when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-fast test-all bench docs lint format venv clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	$(VENV)/bin/python -m pip check
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dolg demo

# One pytest worker per core (pytest-xdist), longest tests first (tests/conftest.py); the modules marked
# `xdist_group` share module fixtures (a server, exports) and each runs on one worker. The 15 slowest tests are
# listed, to keep an eye on the suite's time.
XDIST := -n auto --dist loadgroup --no-loadscope-reorder

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(XDIST) --durations=15

# Unit tests only: no subprocess, no server, no SavedModel export, no multi-step training run.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest $(XDIST) -m "not slow and not integration"

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest $(XDIST) -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/model_forward.py --preset resnet101 --size 512 --batches 1,8
	$(VENV)/bin/python benchmarks/export_resize.py --preset resnet101 --size 512 --batch 4 --repeats 2
	$(VENV)/bin/python benchmarks/index.py --n 200000

clean:
	rm -rf $(VENV) .pytest_cache
