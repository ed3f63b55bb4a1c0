# vfed — `make demo` runs the main job on embedded defaults; `make test` runs the whole suite on real components.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SRC := common node server proxy algorithms client
PYTEST_ARGS ?=

.PHONY: help venv infra images lint test test-only demo fabric chaincode-test clean

help:
	@echo "make demo      run a federated task end to end on embedded defaults"
	@echo "make test      stand up Docker, Mosquitto, PostgreSQL and images, then lint and run every test"
	@echo "make images    build the vfed images (offline-capable: debootstrap base + host wheelhouse)"
	@echo "make lint      ruff + mypy --strict"
	@echo "make chaincode-test   the Fabric ledger chaincode's unit tests (npm ci, node --test, Python vectors)"
	@echo "make test-only PYTEST_ARGS='tests/smoke -m docker'   run pytest without the set-up steps"

$(VENV)/.installed: pyproject.toml scripts/ensure-venv.sh
	@bash scripts/ensure-venv.sh "$(PYTHON)" "$(VENV)"
	@touch $@

venv: $(VENV)/.installed

infra:
	@bash scripts/ensure-infra.sh

images: venv infra
	@PY=$(abspath $(PY)) bash scripts/build-images.sh
	@if [ -x algorithms/examples/build.sh ]; then bash algorithms/examples/build.sh; fi

lint: venv
	@echo "[vfed] ruff"; $(VENV)/bin/ruff check $(SRC) tests bench
	@echo "[vfed] mypy --strict"; $(VENV)/bin/mypy

test: venv infra images lint chaincode-test test-only

test-only: venv
	@VFED_REQUIRE_COMPONENTS=1 bash scripts/run-tests.sh $(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv infra images
	@$(VENV)/bin/vfed demo --work-dir build/demo

chaincode-test: venv
	@cd chaincode && npm ci --cache "$(HOME)/.cache/vfed-npm" --prefer-offline --no-audit --no-fund --loglevel=error
	@cd chaincode && VFED_PYTHON=$(abspath $(PY)) node --test test/

fabric: venv
	@$(VENV)/bin/pip install -q -e '.[fabric]' && $(VENV)/bin/pip install -q --no-deps 'fabric-sdk-py==1.0.0'

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
