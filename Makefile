# tollgate — see README.md. Every target works from a fresh clone with only Python 3.11 installed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tollgate-installed
PROTOS := $(shell find protos -name '*.proto')

.PHONY: setup proto run demo test test-fast lint bench clean

setup: $(STAMP) gen/.stamp

# The venv and every dependency (idempotent: redone only when pyproject.toml changes).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q 'grpcio-tools>=1.85,<2'
	$(MAKE) --no-print-directory proto
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Python stubs (with .pyi) from protos/ into gen/ (not committed).
proto gen/.stamp: $(PROTOS)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I protos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	touch gen/.stamp

run: setup
	$(VENV)/bin/tollgate up

demo: setup
	$(VENV)/bin/tollgate demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not slow"

lint: setup
	$(VENV)/bin/ruff check libs services tests
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint

bench: setup
	$(PY) -m tests.bench.run --write

clean:
	rm -rf $(VENV) gen .tollgate
