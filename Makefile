# Every target does its own set-up, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: setup setup-core hf-tests lint typecheck test test-matrix test-bf16 test-fp32 gpu-check demo bench-setup bench clean

# What the demo needs and nothing more: torch and palm's own dependencies (no compiler runs).
setup-core: $(CORE)
# Everything the tests need: the dev extra (which compiles llama-cpp-python) and Transformers' test sources.
setup: $(STAMP) hf-tests

# llama-cpp-python (in the dev extra, for the GGUF export tests) is compiled from source by pip: ~9 minutes
# on 2 cores, once (pip keeps the wheel). GGML_NATIVE=OFF builds for any x86-64 with AVX2 (x86-64-v3)
# rather than for this processor's extensions; the multimodal library, tools, examples and tests are skipped.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

# torch first, pinned: it is the CPU wheel on local disk; letting pip choose pulls a multi-GB CUDA build.
$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP): $(CORE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e ".[dev]"
	touch $@

# Transformers' common model tests (ModelTesterMixin, ConfigTester) ship in its sdist, not its wheel:
# tests/test_transformers_common.py runs them on palm from $(HF_TESTS)/VERSION, fetched for the
# installed version (a few seconds) and again only when that version changes. An empty __init__.py
# makes the folder the package that their relative imports expect.
HF_TESTS := $(VENV)/transformers-tests
hf-tests: $(STAMP)
	@v=$$($(BIN)/python -c 'from importlib.metadata import version; print(version("transformers"))'); \
	test -f $(HF_TESTS)/$$v/__init__.py || { \
	  echo "fetching the tests of transformers $$v into $(HF_TESTS)/$$v" && rm -rf $(HF_TESTS) && \
	  $(BIN)/pip download -q --no-deps --no-binary :all: transformers==$$v -d $(HF_TESTS) && \
	  mkdir $(HF_TESTS)/$$v.part && tar -xzf $(HF_TESTS)/transformers-$$v.tar.gz -C $(HF_TESTS)/$$v.part \
	    --strip-components=2 --wildcards 'transformers-*/tests/*.py' && \
	  touch $(HF_TESTS)/$$v.part/__init__.py && mv $(HF_TESTS)/$$v.part $(HF_TESTS)/$$v && \
	  rm $(HF_TESTS)/transformers-$$v.tar.gz; }

# ruff: the lint rules and the format of pyproject.toml's [tool.ruff]; `ruff format` rewrites what `lint` refuses.
lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

# mypy on src/palm, at the level pyproject.toml's [tool.mypy] sets.
typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

# Every combination of the training options (tests/test_matrix.py); `make test` runs its pairwise subset.
test-matrix: setup
	$(BIN)/python -m pytest -q tests/test_matrix.py -m ""

# The suite with the bf16 capability check forced either way, so both precision paths run on any processor.
test-bf16: setup
	PALM_FAST_BF16=1 $(BIN)/python -m pytest -q
test-fp32: setup
	PALM_FAST_BF16=0 $(BIN)/python -m pytest -q

# Every GPU check in one run (CUDA tests, bf16 training and decode benchmarks); it refuses to run without a GPU.
gpu-check:
	bench/gpu_check.sh

# Trains a tokenizer and a small bilingual PaLM (about 8 minutes on 2 cores), then shows generations,
# validation bits per byte against a unigram baseline, and where the model, metrics and plot are.
# STEPS=N trains longer. The demo replaces its own previous output in $(DEMO)/run.
STEPS ?= 1400
demo: setup-core
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
