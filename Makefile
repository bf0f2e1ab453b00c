# Two commands on a fresh clone: `make run` serves, `make test` tests. Both install what they need
# into .venv first and are no-ops for the install step when nothing changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Triton's python-backend wheel pins numpy<2 but is only used for its tritonserver binary; installing
# it without dependencies keeps numpy 2 (model.py does its I/O over DLPack, see model_repository/).
PYTRITON := nvidia-pytriton==0.7.0

# Debian packages the tests drive for real (a browser for the pages, nginx for the shipped proxy
# configuration, Prometheus and promtool for the rules and dashboards). As root (CI) `make test`
# installs them; anyone else is told what to install.
SYSTEM_PACKAGES := chromium chromium-driver nginx-light prometheus

.PHONY: install install-dev install-bench system-deps run test lint typecheck unit bench bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools

$(VENV)/.serve-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e .
	$(PIP) install -q --no-deps $(PYTRITON)
	touch $@

$(VENV)/.dev-installed: $(VENV)/.serve-installed
	$(PIP) install -q -c constraints.txt -e '.[dev,export]'
	touch $@

$(VENV)/.bench-installed: $(VENV)/.dev-installed
	$(PIP) install -q -c constraints.txt -e '.[dev,export,bench]'
	touch $@

install: $(VENV)/.serve-installed
install-dev: $(VENV)/.dev-installed
install-bench: $(VENV)/.bench-installed

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "make test needs these Debian packages: sudo apt-get install $$missing" >&2; exit 1; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $$missing >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	fi

run: install
	$(BIN)/palm-serve serve

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy

test: install-dev system-deps lint typecheck
	$(BIN)/pytest

unit: install-dev
	$(BIN)/pytest -m "not integration and not slow"

bench: install-dev
	$(BIN)/python -m loadtest.bench_serving

bench-peers: install-bench
	$(BIN)/python -m loadtest.bench_peers

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
