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

.PHONY: reproduce test install prepare lint bench clean-data

reproduce: prepare
	@echo "== main job: the embedded model's Hessian spectrum (see README for the time it takes)"
	$(PY) -m hess_utils reproduce

test: prepare
	@echo "== tests (offline)"
	$(PY) -m pytest -q

install: $(STAMP)

# torch first, from the CPU wheel; then the project under a constraint that pins torch (else pip pulls CUDA).
$(STAMP): pyproject.toml constraints.txt
	@echo "== installing into $(VENV) (torch==2.13.0 first, then the project)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 2>&1 | $(PIP_FILTER)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | $(PIP_FILTER)
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

# Idempotent: each corpus, tokenizer and model is built once and checked on later runs.
prepare: install
	@echo "== preparing the embedded corpora and models under data/ (cached after the first run)"
	$(PY) -m hess_utils prepare

lint: install
	$(VENV)/bin/ruff check hess_utils tests benchmarks scripts

# Peers under the torch pin. curvlinops requires backpack-for-pytorch, which pulls a CUDA torchvision that
# breaks `import transformers`: curvlinops goes in with --no-deps plus the modules it imports at top level.
BENCH_PEERS := pyhessian==0.1 hessian-eigenthings==1.0.0a5 einops einconv linear_operator opt-einsum
BENCH_ARGS ?=
bench: install
	@echo "== installing the peers (PyHessian, hessian-eigenthings, curvlinops without backpack)"
	$(PY) -m pip install -q -c constraints.txt $(BENCH_PEERS) 2>&1 | $(PIP_FILTER)
	$(PY) -m pip install -q -c constraints.txt --no-deps curvlinops-for-pytorch==3.0.1 2>&1 | $(PIP_FILTER)
	$(PY) -c "import transformers, torch, pyhessian, hessian_eigenthings, curvlinops; assert torch.__version__.startswith('2.13.0')"
	@echo "== benchmark (see benchmarks/README.md; BENCH_ARGS=--quick for a smoke run)"
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean-data:
	rm -rf data/corpora data/models data/tokenizers
