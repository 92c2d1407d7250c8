# `make repro` and `make test` work on a fresh machine: each sets up what it needs first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
DEBIAN_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data repro test test-fast lint constraints clean-venv

## setup: the virtual environment with the project and its tools (pip, editable install),
## with the S3 extra and the S3 server the tests use, at the exact versions in constraints.txt
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,s3]'
	touch $@

## constraints: resolve the newest versions pyproject.toml allows in a scratch environment and
## write them to constraints.txt; then `make test` installs and tests them (commit if it passes)
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install --quiet --upgrade pip
	.venv-constraints/bin/pip install --quiet -e '.[dev,s3]'
	{ echo "# The exact versions the test suite last passed with; make setup installs with them"; \
	  echo "# (pip install -c). Refresh: make constraints (newest allowed versions), then make test."; \
	  .venv-constraints/bin/pip freeze --exclude-editable; } > constraints.txt
	rm -rf .venv-constraints

## data: Debian's copy of Fashion-MNIST where apt can install it; elsewhere the download
## stage fetches the files from the official mirror instead.
data:
	@if [ -f $(DEBIAN_DATA) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; \
	else echo "dataset-fashion-mnist not installed: fashionnet download will use the network"; fi

## repro: the main job, the whole DVC pipeline (download, split, train, evaluate, report).
## When a stage is to run, the stages share one Prefect server (pipeline/prefect_server.py)
## instead of starting a temporary one each.
repro: setup data
	@if dvc status --quiet; then dvc repro; else python -m pipeline.prefect_server dvc repro; fi

## test: the whole test suite, as CI runs it (needs the real data: Debian's package or
## FASHIONNET_SOURCE_DIR), on three workers, a test module each at a time (pytest-xdist; most
## tests wait on servers and processes: on 2 cores, 3 workers took 672 s, 2 took 731 s, and
## one about 15 minutes), the longest modules first (tests/conftest.py). `pytest` alone: one.
PYTEST_WORKERS ?= 3
test: setup data
	pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

## test-fast: the everyday tier, without the end-to-end runs marked slow, on two workers (its
## tests are short, and a third worker's start-up cost more than it saved: 98 s against 93 s)
PYTEST_FAST_WORKERS ?= 2
test-fast: setup data
	pytest -n $(PYTEST_FAST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

lint: setup
	ruff check .
