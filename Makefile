# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Each creates .venv if needed, installs the project, builds the C++ (and, with a CUDA toolkit,
# CUDA) extension, then runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FB := $(VENV)/bin/fused-balance
STAMP := $(VENV)/.installed-stamp

# torch guesses the toolkit root from `which nvcc`, which here is a wrapper script: point it at
# the real root (the folder holding bin/nvcc and lib64/libcudart.so) unless the user did.
ifeq ($(origin CUDA_HOME), undefined)
CUDA_HOME := $(shell for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12 /opt/cuda; do \
	if [ -x $$d/bin/nvcc ] && [ -e $$d/lib64/libcudart.so ]; then echo $$d; break; fi; done)
endif
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif

.PHONY: test demo build bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

build: $(STAMP)
	$(FB) build

test: build
	$(PY) -m pytest

demo: build
	$(FB) info
	$(FB) study --quick --out runs/demo

bench: build
	$(FB) bench --out bench_out

clean:
	rm -rf $(VENV) build .build *.egg-info .pytest_cache .hypothesis
