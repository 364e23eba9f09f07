# The two user commands: `make demo` and `make test`. Both are idempotent: the venv is
# created once, dependencies are re-installed only when pyproject.toml changes, and the
# C++ extension is rebuilt incrementally.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.cupid-deps
DEMO_OUT ?= demo_out
export RAY_AUTH_MODE ?= disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-slow install build bench clean browser

install: build

$(PY):
	@echo "==> creating virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an open range would pull the newest CUDA build (GBs). robosuite last
# and without its dependencies: its pins break numpy 2 / zarr 3 (README, "Installing by hand").
$(STAMP): pyproject.toml | $(PY)
	@echo "==> installing torch==2.13.0 (CPU build)"
	$(PIP) install -q torch==2.13.0
	@echo "==> installing build tools"
	$(PIP) install -q scikit-build-core==1.1.2 pybind11==3.1.0
	@echo "==> installing cupid_engine dependencies (ray, sim, triton, peers, dev)"
	$(PIP) install -q --no-build-isolation -e ".[ray,sim,gpu,peers,dev,s3,gcs]"
	@echo "==> installing robosuite==1.5.2 (--no-deps)"
	$(PIP) install -q --no-deps robosuite==1.5.2
	@touch $(STAMP)

build: $(STAMP)
	@echo "==> building the C++ extension (cupid_engine._C)"
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@$(PY) -c "import cupid_engine._C as c, cupid_engine.ops as o; print('    backends:', o.available_backends(), '| CUDA kernels compiled:', c.has_cuda())"

demo: install
	@echo "==> running the end-to-end demo (writes $(DEMO_OUT)/)"
	$(PY) -m cupid_engine demo --out $(DEMO_OUT)

# The explorer's browser test drives Debian's Chromium; install it where it is missing and
# we may (root with apt-get). Elsewhere the test is skipped with a reason (failed on CI).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "==> installing Chromium (Debian package chromium) for the explorer's browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "==> Chromium is missing and cannot be installed here (needs root and apt-get): browser test skipped"; fi

test: install browser
	@echo "==> running the test suite (slow end-to-end tests: make test-slow)"
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

bench: install
	$(PY) -m cupid_engine bench projection --json benchmarks/out/projection.json

clean:
	rm -rf build $(DEMO_OUT) benchmarks/out
