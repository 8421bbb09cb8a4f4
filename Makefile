# Everyday entry points. `make install test` is what CI does after installing torch.
PYTHON ?= python
BUILD_DIR ?= build/cmake

.PHONY: install build test cpp-test pytest bench cuda-compile cutlass-headers gpu-check clean

install:
	$(PYTHON) -m pip install --no-build-isolation -e ".[test]"

# Rebuild the extension in place after editing csrc/ (faster than a reinstall).
build:
	$(PYTHON) setup.py build_ext --inplace

test: cpp-test pytest

cpp-test:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build $(BUILD_DIR) -j 2
	ctest --test-dir $(BUILD_DIR) --output-on-failure

pytest:
	$(PYTHON) -m pytest -q tests

bench:
	$(PYTHON) bench/attention.py
	$(PYTHON) bench/noise.py

# Compile and assemble every CUDA kernel for A100 (sm_80) and Hopper (sm_90a) with this machine's
# nvcc; no GPU needed. The .cu files are torch-free, so nothing but nvcc, csrc/include and the
# CUTLASS/CuTe headers of the nvidia-cutlass wheel is used; the half-precision defines are the ones
# torch's extension build passes. Any warning in our code fails (CUTLASS is a system include: its
# host-side stubs of device-only atoms have unused parameters).
NVCC ?= nvcc
CUTLASS_MISSING = CUDA kernels need the CUTLASS/CuTe headers: pip install --no-deps nvidia-cutlass==4.2.0.0
# Evaluated only when a CUDA object is built, so other targets do not need the wheel.
CUTLASS_INCLUDE = $(shell $(PYTHON) -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))" 2> /dev/null)
CUDA_GENCODE = -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a
NVCC_CHECK_FLAGS = -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr $(CUDA_GENCODE) \
	-Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -Icsrc/include -isystem $(CUTLASS_INCLUDE) \
	-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
	-D__CUDA_NO_HALF2_OPERATORS__
CU_SOURCES := $(shell find csrc -name '*.cu' | sort)
CU_OBJECTS := $(patsubst csrc/%.cu,build/cuda-compile/%.o,$(CU_SOURCES))

cuda-compile: cutlass-headers $(CU_OBJECTS)
	@echo "cuda-compile: $(words $(CU_SOURCES)) CUDA source(s) compiled for sm_80 and sm_90a without warnings"

cutlass-headers:
	@test -n "$(CUTLASS_INCLUDE)" || { echo "$(CUTLASS_MISSING)" >&2; exit 1; }

build/cuda-compile/%.o: csrc/%.cu $(shell find csrc -name '*.h' -o -name '*.cuh') | cutlass-headers
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_CHECK_FLAGS) -I$(dir $<) -c $< -o $@

# On a GPU machine: CUDA build, CUDA tests, GPU benchmarks -> bench/results/<card>-<date>/.
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

clean:
	rm -rf build walt/_C*.so *.egg-info
