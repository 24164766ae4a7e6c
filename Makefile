# `make run` and `make test` each set up .venv on their own, then do their job.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls the CUDA build. Everything else comes
# at the versions in constraints.txt, the ones the tests last passed with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pipeline stage=all

test: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/targets.py
	$(BIN)/python benchmarks/geometry.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/scale.py

clean:
	rm -rf $(VENV) outputs
