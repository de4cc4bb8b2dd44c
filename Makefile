PYTHON ?= python3

.PHONY: install test lint demo bench stack-up stack-down

install:  ## Python package with test tools, plus the local stack's own installs
	$(PYTHON) -m pip install -q -e '.[test]'
	ops/devstack install

test: install  ## the whole suite: lint, types, units, integration against the local stack
	$(PYTHON) -m pytest

lint:
	ruff check .
	ruff format --check .
	mypy

demo: install  ## stack up, sample traffic, the enricher, a session summary, stack down
	ops/demo

bench:  ## throughput, latency and Redis cost against a passthrough ceiling (15-25 min)
	$(PYTHON) -m pip install -q -e '.[test,bench]'
	ops/devstack install
	$(PYTHON) -m bench

stack-up:
	ops/devstack up

stack-down:
	ops/devstack down
