# Hypha: every set-up step lives here, so a fresh clone needs only `make run` / `make test`.
#
#   make run        the main job: a whole Hypha network on 127.0.0.1 training a GPT with DiLoCo
#                   (python -m hypha up; RUN_ARGS="--workers 4 --codec int4" passes flags)
#   make test       build everything, then ruff, mypy, ctest (+ CUDA compile check) and pytest
#   make bench      the kernel and codec benchmarks (bench/README.md); bench-convergence and
#                   bench-sync run the DiLoCo ones, bench-transport the network's throughput,
#                   bench-e2e the whole network (3 workers, one throttled; perf-aware sync)
#
# Variables: PYTHON (interpreter for the venv), VENV, TORCH_SPEC (how torch is installed when the
# venv has none; the default is the CPU build that installs offline on the project's machines —
# on a GPU machine use e.g. TORCH_SPEC=torch, or VENV_FLAGS=--system-site-packages to reuse an
# installed CUDA torch), HYPHA_SKIP_CUDA=1 and HYPHA_CUDA_ARCHS="80;90" for the extension build.

PYTHON     ?= python3
VENV       ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check
CMAKE_DIR  := build/cmake
CSRC       := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc' 2>/dev/null)
EXT_STAMP  := $(VENV)/.hypha-ext

export PYTHONDONTWRITEBYTECODE = 1

.PHONY: all install build run test lint typecheck ctest pytest bench clean distclean bench-sync bench-convergence bench-transport bench-e2e

all: build

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

# torch first (a bare `torch` requirement would pull the CUDA wheels), then the package with its
# dependencies, built without isolation against that torch.
$(VENV)/.installed: pyproject.toml setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --no-build-isolation -e ".[dev,triton,bench]"
	touch $@ $(EXT_STAMP)

install: $(VENV)/.installed

# rebuild the extension in place when a C++/CUDA source changes (ninja makes it incremental)
$(EXT_STAMP): $(VENV)/.installed $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(EXT_STAMP)

run: build
	$(PY) -m hypha up $(RUN_ARGS)

lint: install
	$(VENV)/bin/ruff check hypha kernels tests bench examples

typecheck: install
	$(VENV)/bin/mypy

ctest: install
	cmake -S . -B $(CMAKE_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build $(CMAKE_DIR)
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

pytest: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q

test: lint typecheck ctest pytest

bench: build
	$(PY) bench/kernels.py
	$(PY) bench/blocksize.py

# DiLoCo against DDP on a small GPT, 8 runs (about 17 minutes on 2 cores), with its plot
bench-convergence: build
	$(PY) -c "import matplotlib" 2>/dev/null || $(PIP) install -q "matplotlib>=3.5"
	$(PY) bench/convergence.py

# 256 MiB between two processes: TCP, TLS, our tensor stream (1 and 4 streams), via the relay
bench-transport: install
	$(PY) bench/transport.py

# the main job end to end: 3 equal workers, then one throttled 3x, perf-aware sync off and on
bench-e2e: build
	$(PY) bench/e2e.py

clean:
	rm -rf build hypha/_C*.so .pytest_cache .mypy_cache .ruff_cache $(EXT_STAMP)

distclean: clean
	rm -rf $(VENV) *.egg-info

# bench/sync.py compares with torchft's DiLoCo. torchft is a benchmark-only dependency: installed
# with --no-deps (its wheel requires a bare `torch`, which would pull the CUDA build over the
# venv's) into the ignored .bench-deps/, with its pure-Python dependencies; bench/sync.py puts
# that folder at the end of sys.path itself.
BENCH_DEPS := .bench-deps
TORCHFT    := torchft==0.2.0
OTEL       := opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2

$(BENCH_DEPS)/.installed: | $(PY)
	$(PIP) install -q --upgrade --no-deps --target $(BENCH_DEPS) "$(TORCHFT)"
	$(PIP) install -q --upgrade --target $(BENCH_DEPS) $(OTEL)
	touch $@

bench-sync: build $(BENCH_DEPS)/.installed
	$(PY) bench/sync.py
