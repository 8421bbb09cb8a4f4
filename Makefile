# Everyday entry points. `make install test` is what CI does after installing torch.
PYTHON ?= python
BUILD_DIR ?= build/cmake

.PHONY: install build test cpp-test pytest bench clean

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

clean:
	rm -rf build walt/_C*.so *.egg-info
