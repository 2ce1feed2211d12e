# Two commands for a new user: `make demo` (install + the digits run) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/digits

.PHONY: install demo lint test test-fast gpu-check image-check clean help

help:
	@echo "make demo   create $(VENV), install everything, run configs/digits.yaml into $(OUT)"
	@echo "make test   install (if needed, with the test extra) and run the test suite, two pytest workers (PYTEST_WORKERS=0: one process)"
	@echo "make test-fast  the suite without the whole-CLI-run files (end_to_end) and the few 20 s tests (slow): the edit loop"
	@echo "make lint   ruff (the rules in pyproject.toml)"
	@echo "make gpu-check  on a GPU machine: every GPU path checked and measured in <= 8 min (GPU_CHECK_OUT, default gpu-check.json)"
	@echo "make image-check  build docker/'s images with podman and run mid inside them (not in make test: it downloads torch's dependencies)"
	@echo "make clean  remove runs/ and the local store (keeps $(VENV))"

# A torch wheel that pip's own configuration provides locally (e.g. a CPU build in a
# find-links folder) is installed first, so the project's `torch` requirement is already
# met and pip never reaches for a CUDA build. Elsewhere this finds nothing and the
# ordinary torch from the index is installed with the project.
# pip byte-compiles what it installs, and must: CI and this machine set
# PYTHONDONTWRITEBYTECODE=1, so a package installed with --no-compile is compiled from source
# by every process that imports it, every Ray worker included (the suite took 2,691 s
# instead of 1,427 s, docs/testing.md).
PIP_INSTALL = $(BIN)/pip install --quiet
$(BIN)/mid: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	-$(PIP_INSTALL) --no-index --no-deps torch 2>/dev/null
	$(PIP_INSTALL) -e .
	@touch $@

# The test extra (pytest, an S3 server, ONNX) on top: the demo does not wait for it.
$(VENV)/.test-extra: $(BIN)/mid
	$(PIP_INSTALL) -e ".[test]"
	@touch $@

install: $(BIN)/mid

REFRESHED_ROWS = mid run configs/digits.yaml --out $(OUT)-refreshed --set 'eval.defenses=[None, AT, MID, MID-R, ATTA]'

demo: install
	$(BIN)/mid run configs/digits.yaml --out $(OUT)
	@echo "Next: the two rows trained on pools refreshed against themselves (MID-R, ATTA), on this demo's store, every stage above reused (their training about 3 minutes on 2 cores, then their evaluation):"
	@echo "  $(BIN)/$(REFRESHED_ROWS)"

lint: $(VENV)/.test-extra
	$(BIN)/ruff check .

# Two pytest processes on 2 cores (docs/testing.md: how much that saves), one xdist group
# per module (tests/conftest.py's scheduler); then, alone, the few tests that measure a time limit.
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider -q
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --no-loadscope-reorder)

test: $(VENV)/.test-extra
	$(PYTEST) --durations=15 $(XDIST) -m "not serial" tests
	$(PYTEST) --durations=5 -m serial tests

test-fast: $(VENV)/.test-extra
	$(PYTEST) --durations=10 $(XDIST) -m "not end_to_end and not slow" tests

# One prepared command for a GPU machine (benchmarks/gpu_check.py); `mid plan --calibrate` reads its file.
GPU_CHECK_OUT ?= gpu-check.json
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

# Needs podman (and debootstrap where registry images cannot be pulled); docker/image_check.sh.
image-check:
	bash docker/image_check.sh

clean:
	rm -rf runs store
