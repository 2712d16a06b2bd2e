# Two commands on a fresh machine: `make search` (the main job) and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.circtune-installed

.PHONY: setup search demo profile test test-fast lint bench clean wheels gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 (a CPU build on this kind of machine) only when no torch is importable: a bare
# `torch` requirement would pull a multi-GB CUDA build, and GPU machines bring their own torch. PYTHONWARNINGS: setuptools
# notes every editable install ("Editable installation... folders with the same name"), which tells a user nothing.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e ".[dev]"
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

# The inner loop: everything but the multi-process, database-server and end-to-end tests (marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_adapters.py

# A GPU machine reaches no package registry: `make wheels` (here) fetches into .whl/ what circtune needs beyond that
# machine's image; .whl/ travels with the working tree (carry ".whl"). There, `make gpu-check` installs it offline
# and runs every GPU stage in one command; without CUDA it runs the same stages as a tiny CPU rehearsal.
GPU_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))

wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py download

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
