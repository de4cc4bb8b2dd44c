# Everything runs in the project's own virtualenv (.venv), created on first use, so that a
# Python that refuses system-wide installs (PEP 668) works too. Its bin/ comes first on PATH,
# so ops/devstack, ops/demo and the tests' subprocesses run under the same interpreter.
VENV ?= .venv
BOOTSTRAP_PYTHON ?= python3
PYTHON := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
# The unit tests: no service, no node, no promtool.
UNIT_MARKERS := not integration and not node and not promtool

.DEFAULT_GOAL := help
.PHONY: help venv install unit test lint format demo bench stack-up stack-down

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(BOOTSTRAP_PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, apt-get install python3-venv" >&2; exit 1; }
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed  ## the project's virtualenv with the package and its test tools

install: venv  ## the virtualenv plus the local stack's own installs (each skipped when done)
	ops/devstack install

unit:  ## the pure unit tests, with no install step (needs Python and the package's deps)
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) -m pytest tests/unit -m "$(UNIT_MARKERS)"

lint: venv  ## ruff (lint and format check) and mypy: the one definition of lint
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

format: venv  ## ruff's fixes and formatting, in place
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

test: install  ## lint, then the unit tests, then the integration tests against the local stack
	$(MAKE) --no-print-directory lint
	$(PYTHON) -m pytest tests/unit
	$(PYTHON) -m pytest tests/integration

demo: install  ## stack up, sample traffic, the enricher, a session summary, stack down (DEMO_FLAGS=--collector: collector records)
	ops/demo $(DEMO_FLAGS)

# The revision the per-event work is measured against (its `enricher run`, in the same runs).
BENCH_FLAGS ?= --baseline dfa9046

bench: install  ## throughput, latency and Redis cost against a passthrough ceiling (25-40 min)
	$(PYTHON) -m pip install -q -e '.[test,bench]'
	$(PYTHON) -m bench $(BENCH_FLAGS)

stack-up: venv  ## a local Kafka + Redis (prints ENRICHER_* settings)
	ops/devstack up

stack-down: venv  ## stop it
	ops/devstack down
