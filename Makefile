# p2pfs: `make demo` and `make test` set up everything they need (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.p2pfs-installed

.PHONY: setup system-deps demo test bench lint clean

setup: system-deps $(STAMP)

# Debian packages: FUSE 3 and its headers for pyfuse3, a C toolchain and the
# Python headers for the Cython build, fio and stress-ng for the read checks.
system-deps:
	@./.ci/system-deps

$(STAMP): pyproject.toml native/fastcdc.pyx p2pfs/__init__.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel "Cython==3.3.1"
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	@# Our own C build again with warnings as errors (only ours: pyfuse3 builds from source too).
	CFLAGS=-Werror $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Rebuild the extension in place when native/ changes after the first install.
native: setup
	CFLAGS=-Werror $(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: setup
	$(PY) -m p2pfs.lab.demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	@./.ci/system-deps --bench
	$(PY) -m benchmarks.run $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check p2pfs tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info p2pfs/*.so p2pfs/*/*.so native/*.c
