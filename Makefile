# The two commands: `make demo` and `make test`. Both create .venv, install the pinned
# requirements, build the extension (CPU kernels, plus CUDA kernels when torch is a CUDA build and
# nvcc is found: CUDA_HOME defaults to /usr/local/cuda) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
# No GPU visible: compile the CUDA kernels for H100/H200 (sm_90).
export TORCH_CUDA_ARCH_LIST ?= 9.0
# Two build jobs: a .cu translation unit takes ~2 GB of RAM in nvcc.
export MAX_JOBS ?= 2

.PHONY: all build test test-all demo bench clean

all: build

$(VENV)/.installed: requirements/base.txt requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $@

# The extension is rebuilt only when a source, setup.py or the requirements changed (or the built
# module is missing): pip's editable install compiles every file from scratch each time (~5 min
# with the CUDA kernels on 2 cores).
EXT_SOURCES := $(shell find csrc -type f) setup.py gptoss_ext/_isa.py
ifeq ($(wildcard gptoss_ext/_C*.so),)
$(shell rm -f $(VENV)/.built)
endif

$(VENV)/.built: $(VENV)/.installed $(EXT_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q -m "not slow"

test-all: build
	$(PY) -m pytest -q

demo: build
	$(PY) -m gptoss.demo

bench: build
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf build *.egg-info gptoss_ext/_C*.so gptoss_ext/_build_info.json $(VENV)/.built
