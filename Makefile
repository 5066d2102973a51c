# Two entry points: `make figures` rebuilds every figure of the default grid,
# `make test` runs the test suite. Both create .venv with pinned packages first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: figures paper test test-cluster lint clean

$(BIN)/snakemake: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

figures: $(BIN)/snakemake
	$(BIN)/snakemake --cores $(CORES)

paper: $(BIN)/snakemake
	$(BIN)/snakemake --cores $(CORES) --configfile config/paper.yaml

test: $(BIN)/snakemake
	$(BIN)/python -m pytest -q -m "not cluster"

test-cluster: $(BIN)/snakemake
	$(BIN)/python -m pytest -q -m cluster tests/cluster

lint: $(BIN)/snakemake
	$(BIN)/snakemake --lint

clean:
	rm -rf results figures logs report.html .snakemake
