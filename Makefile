# Every target does its own set-up, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: setup test demo clean

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

clean:
	rm -rf $(VENV) $(DEMO)
