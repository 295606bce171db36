# Every target does its own set-up, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: setup test demo bench-setup bench clean

setup: $(STAMP)

# torch first, pinned: it is the CPU wheel on local disk; letting pip choose pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# Trains a tokenizer and a small bilingual PaLM (about 8 minutes on 2 cores), then shows generations,
# validation bits per byte against a unigram baseline, and where the model, metrics and plot are.
# STEPS=N trains longer. The demo replaces its own previous output in $(DEMO)/run.
STEPS ?= 1400
demo: setup
	$(BIN)/python examples/demo.py --out $(DEMO)/run --steps $(STEPS)

# The benchmark peers (the `bench` extra), then litgpt with --no-deps: litgpt pins huggingface-hub<1.4,
# which Transformers 5 cannot use, though its model code runs fine beside it. Its own runtime needs
# (lightning, jsonargparse, psutil) are in the extra.
bench-setup: setup
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/pip install -q --no-deps "litgpt==0.5.13"

# Training-step, tokenizer and quality benchmarks against the peers (a few minutes); BENCH=full for all shapes.
bench: bench-setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/report.py $(if $(filter full,$(BENCH)),,--quick)

clean:
	rm -rf $(VENV) $(DEMO)
