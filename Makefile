# Two commands on a fresh machine: `make search` (the main job) and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.circtune-installed

.PHONY: setup search demo profile test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 (a CPU build on this kind of machine) only when no torch is importable: a bare
# `torch` requirement would pull a multi-GB CUDA build, and GPU machines bring their own torch.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

search: $(STAMP)
	$(BIN)/circtune search --model roberta-large --budget 100k

demo: $(STAMP)
	$(BIN)/circtune demo

profile: $(STAMP)
	$(BIN)/circtune profile --model roberta-large

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_adapters.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
