# Two commands for users: `make reproduce` (set up, then run the main job) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_FILTER := grep -v -e "is ignored: it is neither a file nor a directory" || true
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: reproduce test install prepare lint bench clean-data lock test-latest core-smoke

reproduce: prepare
	@echo "== main job: the embedded model's Hessian spectrum (see README for the time it takes)"
	$(PY) -m hess_utils.harness reproduce

test: prepare core-smoke
	@echo "== tests (offline)"
	$(PY) -m pytest -q

install: $(STAMP)

# The tested environment is locked: requirements.lock pins every package `make test` and `make reproduce`
# install, transitive ones included, for Linux x86_64 and CPython 3.11, torch as its CPU build. uv (pinned,
# kept outside the venv so an install never removes it) resolves and installs; pyproject.toml keeps ranges
# for people who install the library into an environment of their own.
UV_VERSION := 0.13.8
LOCK := requirements.lock
TOOLS := .tools
UV := $(TOOLS)/bin/uv
# Where the CPU build of torch comes from: a folder of wheels where this machine has one, else PyTorch's CPU
# index (uv looks at no pip configuration, so it is told).
TORCH_WHEELS ?= $(wildcard /opt/wheels)
TORCH_SOURCE := $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)

$(UV):
	@echo "== uv $(UV_VERSION) into $(TOOLS)"
	$(PYTHON) -m pip install -q --root-user-action=ignore --target $(TOOLS) uv==$(UV_VERSION) 2>&1 | $(PIP_FILTER)

$(STAMP): pyproject.toml $(LOCK) | $(UV)
	@echo "== syncing $(VENV) to $(LOCK) with uv (what the lock does not name is removed), then the project"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(UV) pip sync -q --python $(PY) $(TORCH_SOURCE) $(LOCK)
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	$(PY) scripts/check_lock.py $(LOCK)
	@touch $(STAMP)

# Refresh the lock on purpose (newest releases the ranges of pyproject.toml allow), then run `make test`.
lock: | $(UV)
	printf "pip\nsetuptools>=68\n" | $(UV) pip compile -q pyproject.toml - --extra harness --extra dev $(TORCH_SOURCE) --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-emit-index-url --no-emit-find-links \
		--custom-compile-command "make lock" -o $(LOCK)

# Drift check, not part of CI: the newest releases, unlocked, in a scratch venv with its own data folder
# (the tiny models are retrained under the new versions), then the whole suite.
LATEST := .venv-latest
test-latest: | $(UV)
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(UV) pip install -q --python $(LATEST)/bin/python $(TORCH_SOURCE) "torch==2.13.0" --upgrade -e ".[harness,dev]" setuptools
	$(LATEST)/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
	@echo "== how the newest releases differ from requirements.lock (information, not a failure)"
	-$(LATEST)/bin/python scripts/check_lock.py requirements.lock
	HESS_UTILS_DATA=$(CURDIR)/$(LATEST)/data $(LATEST)/bin/python -m hess_utils.harness prepare
	HESS_UTILS_DATA=$(CURDIR)/$(LATEST)/data $(LATEST)/bin/python -m pytest -q -p no:cacheprovider

# The library on its own dependencies (pyproject's [project] dependencies at the lock's versions, no harness
# extra): hessian_operator -> slq -> gaussian_density runs and imports nothing of the harness.
CORE := .venv-core
core-smoke: | $(UV)
	@echo "== the library alone: $(CORE) with pyproject's dependencies only"
	rm -rf $(CORE)
	$(PYTHON) -m venv $(CORE)
	$(UV) pip install -q --python $(CORE)/bin/python $(TORCH_SOURCE) -c $(LOCK) setuptools -e .
	$(CORE)/bin/python scripts/core_smoke.py

# Idempotent: each corpus, tokenizer and model is built once and checked on later runs.
prepare: install
	@echo "== preparing the embedded corpora and models under data/ (cached after the first run)"
	$(PY) -m hess_utils.harness prepare

lint: install
	$(VENV)/bin/ruff check hess_utils tests benchmarks scripts

# Peers under the torch pin. curvlinops requires backpack-for-pytorch, which pulls a CUDA torchvision that
# breaks `import transformers`: curvlinops goes in with --no-deps plus the modules it imports at top level.
BENCH_PEERS := pyhessian==0.1 hessian-eigenthings==1.0.0a5 einops einconv linear_operator opt-einsum
BENCH_ARGS ?=
# The top-k eigenpairs side by side (issue 16): ours, ARPACK on to_scipy(), PyHessian; two rotated rounds of the
# main rows, then PyHessian and the memory-flatness rows once (about 15 min on 2 cores). --quick: the small GPT-2.
EIGS_ARGS ?= --k 5 --repeats 2 --ours-tols 1e-5 --scipy-tols 1e-4 --pyhessian 1e-3:100 --extras memory \
	$(if $(findstring --quick,$(BENCH_ARGS)),--quick --memory-budget 20,)
bench: install
	@echo "== installing the peers (PyHessian, hessian-eigenthings, curvlinops without backpack)"
	$(UV) pip install -q --python $(PY) $(TORCH_SOURCE) -c $(LOCK) $(BENCH_PEERS)
	$(UV) pip install -q --python $(PY) $(TORCH_SOURCE) --no-deps curvlinops-for-pytorch==3.0.1
	$(PY) -c "import transformers, torch, pyhessian, hessian_eigenthings, curvlinops; assert torch.__version__.startswith('2.13.0')"
	@echo "== benchmark (see benchmarks/README.md; BENCH_ARGS=--quick for a smoke run)"
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	@echo "== top-k eigenpairs against ARPACK and PyHessian (benchmarks/eigs.py)"
	$(PY) -m benchmarks.eigs --results-md $(EIGS_ARGS)
	@echo "== re-orthogonalisation modes on the GPT-2 shape's Hessian (benchmarks/reorth_modes.py, about 2 min)"
	$(PY) -m benchmarks.reorth_modes $(if $(findstring --quick,$(BENCH_ARGS)),--iters 20,--results-md)

clean-data:
	rm -rf data/corpora data/models data/tokenizers
