# The README's commands. CI runs `make test` (via .ci/run) on a fresh clone: 2 cores, no GPU.
#   make demo        the benchmark's demo (CPU references when there is no GPU)
#   make test        setup + build (+ the eager fast path) + C++ suites (ctest) + Python suites
#   make gpu-check   on the GPU machine (no network): build, every suite, sanitizers, bench
#   make peer-wheels the fla wheels that gpu-check's bench installs there (carry .whl/)
PYTHON     ?= python3
CUDA_ARCHS ?= 80;89;90
JOBS       ?= 2
BUILD      ?= build
GTEST_DIR  := $(CURDIR)/.deps/usr/src/googletest
WITH_CUDA  ?= $(if $(shell command -v nvcc 2>/dev/null),ON,OFF)
GENERATOR  := $(if $(shell command -v ninja 2>/dev/null),-G Ninja,)
export OUT ?= $(CURDIR)/out

.PHONY: setup gtest build fast-path test demo gpu-check peer-wheels format clean

setup: gtest
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

gtest:
	bash scripts/fetch_gtest.sh

build: gtest
	cmake -S . -B $(BUILD) $(GENERATOR) -DNSA_SEL_WITH_CUDA=$(WITH_CUDA) \
	  -DNSA_SEL_CUDA_ARCHS="$(CUDA_ARCHS)" -DNSA_SEL_GTEST_SOURCE_DIR=$(GTEST_DIR)
	cmake --build $(BUILD) -j$(JOBS)

# The eager fast path (torch C++ extension, nsa/kernels/_fast.py) into the build cache.
fast-path: setup
	$(PYTHON) -m nsa.kernels.build_fast_path

test: setup build fast-path
	bash scripts/run_ctest.sh $(BUILD)
	NSA_SEL_LIB=$(CURDIR)/$(BUILD)/libnsa_sel.so bash scripts/run_pytest.sh -q nsa/tests

demo: setup
	$(PYTHON) bench/bench_sel_cuda.py --demo

gpu-check:
	bash scripts/gpu_check.sh

# The benchmark's fla peer for the GPU machine (no network there): carry .whl/ with gpu-check.
peer-wheels:
	$(PYTHON) -m pip download -q --no-deps -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0

format:
	clang-format -i csrc/include/nsa_sel/* csrc/src/*.[ch]pp csrc/torch/*.cpp csrc/src/cuda/*.cu csrc/src/cuda/*.cuh csrc/tests/*.cpp
	ruff format nsa bench && ruff check --fix nsa bench

clean:
	rm -rf $(BUILD) build-gpu out
