# Every install step lives here, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU-safe pins checked together on the 2-core machine; torch comes from the CPU wheel on disk.
PINS := torch==2.13.0 diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 safetensors==0.8.0 tenacity==9.2.1

.PHONY: setup test demo bench browser clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PINS) -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Debian's chromium drives the browser tests (report and review page); Playwright uses it, never its own download.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium could not be installed; browser tests will be skipped"

test: setup browser
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/magic demo

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache
