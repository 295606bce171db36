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

demo: setup
	$(BIN)/palm tokenizer train --corpus $$($(BIN)/python -c 'import json, os; print(os.path.dirname(json.__file__))') \
		--corpus examples/corpus --vocab-size 4096 --out $(DEMO)/tokenizer --force
	$(BIN)/palm init --preset tiny --tokenizer $(DEMO)/tokenizer --out $(DEMO)/model --force
	$(BIN)/python examples/generate.py $(DEMO)/model "我喜欢编程，因为"

clean:
	rm -rf $(VENV) $(DEMO)
