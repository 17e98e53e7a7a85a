# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Each creates .venv if needed, installs the project with the pinned package set (constraints.txt),
# builds the C++ (and, with a CUDA toolkit, CUDA) extension, then runs.
SHELL := /bin/bash
VENV ?= .venv
PINS ?= constraints.txt
PY := $(VENV)/bin/python
FB := $(VENV)/bin/fused-balance
STAMP := $(VENV)/.installed-stamp
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q
LATEST := .venv-latest

# torch guesses the toolkit root from `which nvcc`, which here is a wrapper script: point it at
# the real root (the folder holding bin/nvcc and lib64/libcudart.so) unless the user did.
ifeq ($(origin CUDA_HOME), undefined)
CUDA_HOME := $(shell for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12 /opt/cuda; do \
	if [ -x $$d/bin/nvcc ] && [ -e $$d/lib64/libcudart.so ]; then echo $$d; break; fi; done)
endif
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif

.PHONY: test test-latest pins demo testbed build bench gpu-check clean

$(STAMP): pyproject.toml $(PINS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) -c $(PINS) -e '.[test]'
	@touch $(STAMP)

build: $(STAMP)
	$(FB) build

# pytest exits 5 when no test ran: make fails on it, so an empty run cannot pass.
test: build
	$(PY) -m pytest

# Upstream drift: the newest releases the registry serves (not pinned, not run by CI), in a
# virtualenv of its own; lists what differs from the pins, then runs the whole suite.
test-latest:
	@test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --disable-pip-version-check -q --upgrade --upgrade-strategy eager -e '.[test]'
	@$(LATEST)/bin/python -m pip freeze --all --exclude-editable --disable-pip-version-check \
		| grep -v -E '^(pip|wheel)==' | diff <(grep -v '^#' $(PINS)) - \
		&& echo "latest releases = the pins" || echo "(< pinned, > latest)"
	$(LATEST)/bin/fused-balance build
	$(LATEST)/bin/python -m pytest

# After a green `make test-latest`: write its package set into the pins.
pins:
	@test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 2; }
	{ grep '^#' $(PINS); $(LATEST)/bin/python -m pip freeze --all --exclude-editable \
		--disable-pip-version-check | grep -v -E '^(pip|wheel)=='; } > $(PINS).new && mv $(PINS).new $(PINS)

# The study runs on the CPU: on a machine without a GPU the demo builds the C++ kernels only (about
# a minute; the CUDA kernels, several minutes more, are built by `make test` or on a GPU machine).
demo: export FUSED_BALANCE_NO_CUDA ?= $(shell nvidia-smi -L >/dev/null 2>&1 || echo 1)
# The quick study's jobs in two processes (one per core: emu2 | chameleon + llava, about the same
# work), then one report from every job file; a failing process fails the demo.
demo: build
	$(FB) info
	@mkdir -p runs/demo
	$(FB) study --quick --out runs/demo --only emu2 --no-plots > /dev/null & first=$$!; \
	$(FB) study --quick --out runs/demo --only chameleon --only llava --no-plots --no-progress > /dev/null; \
	second=$$?; wait $$first && test $$second = 0
	$(FB) study --quick --out runs/demo --report-only

# The study's two testbeds (unified; encoder+LLM) judged before any method runs (issue 21): ACCEPTED or NOT, and why;
# then the methods where the unified check found the regime, the schedulers where the encoder+LLM one accepted.
testbed: build
	$(FB) study --testbed-check --quick --out runs/testbed

bench: build
	$(FB) bench --out bench_out

# On a machine with a CUDA GPU: every check the CPU cannot run, and GB/s against a device copy.
gpu-check: build
	$(FB) gpu-check

clean:
	rm -rf $(VENV) $(LATEST) build .build *.egg-info .pytest_cache .hypothesis
